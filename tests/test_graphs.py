"""CUDA graphs of the streaming fast path (pipeline/graphs.py).

GPU only: a video replayed from graphs equals the same pipeline run eagerly, bit for bit (the replay launches the
very kernels the eager call launched, on the same data), for chunk-wise and frame-wise schedules, a prompt switch, a
second stream while the first holds the kept cache, and the calls no graph serves (a window that slides, with sink
frames; Rolling Forcing), which must run eagerly. The CPU path keeps no graphs (tests/test_fast_path.py).
"""

import pytest
import torch

from model.config import WanConfig
from model.scheduler import FlowMatchScheduler
from model.wan import WanModel
from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=4, text_len=16)
DEV, DTYPE = "cuda", torch.bfloat16


def make_pipe(frames_per_block, steps, first=None, graphs=True, **kw):
    torch.manual_seed(0)
    model = WanModel(CFG, causal=True, num_frame_per_block=frames_per_block).to(DEV, DTYPE).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)   # Wan zero-inits the head; make the output depend on the input
    sch = FlowMatchScheduler(shift=5.0)
    pipe = StreamingPipeline(model, None, None, sch, StepSchedule.from_config(sch, steps, first),
                             latent_shape=(16, 4, 6), device=torch.device(DEV), dtype=DTYPE, **kw)
    return pipe.enable_fast_path(compile=False, graphs=graphs)   # eager regions keep the test fast


def ctx(seed):
    return torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(seed)).to(DEV, DTYPE)


def latents(pipe, num_frames, switch_at=None, seed=3):
    stream = pipe.open("x", num_latent_frames=num_frames, seed=seed, decode=False, context=ctx(1))
    out = []
    for chunk in stream:
        out.append(chunk.latents)
        if chunk.block_index == switch_at:
            stream.switch_prompt("y", context=ctx(2))
    return torch.cat(out, 1)


@pytest.mark.parametrize("n, steps, first", [(3, [1000, 750, 500, 250], None), (1, [1000, 500], [1000, 750, 500])])
def test_replayed_video_equals_eager(n, steps, first):
    eager, graphed = make_pipe(n, steps, first, graphs=False), make_pipe(n, steps, first)
    reference = latents(eager, 9)
    assert torch.equal(latents(graphed, 9), reference)      # first video: eager calls, graphs captured
    count = graphed.graphs.num_graphs
    # one graph per key (start frame, blocks, shape): block 0's steps (the prompt's cross-attention K/V filled before
    # its first), and per later block its first step (fused with the context pass before it) and its later steps
    assert count == 1 + 2 * (9 // n - 1)
    for seed in (3, 4):   # later videos replay (a new seed: new noise, same graphs)
        assert torch.equal(latents(graphed, 9, seed=seed), latents(eager, 9, seed=seed))
    assert graphed.graphs.num_graphs == count and not graphed.graphs.disabled


def test_prompt_switch_rewrites_the_cross_attention_cache_in_place():
    eager, graphed = make_pipe(3, [1000, 500]), make_pipe(3, [1000, 500])
    reference = latents(eager, 9, switch_at=0)
    for _ in range(2):
        assert torch.equal(latents(graphed, 9, switch_at=0), reference)


def test_sliding_window_and_sinks_run_eagerly_past_the_capacity():
    kw = dict(local_attn_size=6, sink_size=3)
    eager, graphed = make_pipe(3, [1000, 500], **kw), make_pipe(3, [1000, 500], **kw)
    reference = latents(eager, 18)
    for _ in range(2):
        assert torch.equal(latents(graphed, 18), reference)
    # graphs only for calls that end within the 6-frame cache: block 0's second step, block 1's two steps
    assert graphed.graphs.num_graphs == 3


def test_rolling_forcing_runs_eagerly():
    kw = dict(local_attn_size=9, sink_size=3, rolling_span=6)
    eager, graphed = make_pipe(3, [1000, 500], **kw), make_pipe(3, [1000, 500], **kw)
    reference = latents(eager, 12)
    for _ in range(2):
        assert torch.equal(latents(graphed, 12), reference)
    assert graphed.graphs.num_graphs == 0


def test_a_second_open_stream_gets_its_own_cache_and_runs_eagerly():
    eager, graphed = make_pipe(3, [1000, 500], graphs=False), make_pipe(3, [1000, 500])
    latents(graphed, 9)                                        # capture
    holder = graphed.open("x", num_latent_frames=9, seed=3, decode=False, context=ctx(1))
    next(holder)                                               # holds the kept cache
    other = graphed.open("x", num_latent_frames=9, seed=3, decode=False, context=ctx(1))
    assert other.cache is not holder.cache and not other.leased
    assert torch.equal(torch.cat([c.latents for c in other], 1), latents(eager, 9))
    rest = torch.cat([c.latents for c in holder], 1)           # the holder is undisturbed
    assert torch.equal(rest, latents(eager, 9)[:, 3:])
    assert graphed.open("x", num_latent_frames=9, decode=False, context=ctx(1)).leased   # handed back at the end
