"""The inference fast path (issue 8): compiled DiT regions and VAE decode overlapped on a side stream.

CPU: the compiled regions are traced with the ``aot_eager`` backend (graph capture and functionalisation without
inductor's code generation, so the test stays fast) and must equal the eager model exactly; the graphs must be shared
by every layer (compile time independent of depth). CUDA only: inductor-compiled streaming within bf16 tolerance of
eager, and the overlapped stream hands out the same frames as the serial one.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from model import attention
from model.config import WanConfig
from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from model.vae import WanVAE
from model.wan import WanModel
from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline
from toy.folders import TINY_VAE
from utils.video import to_uint8_frames

CFG = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=4, text_len=16)


def stream_blocks(model, x, ctx, device, dtype, frames_per_block):
    """Frame-block by frame-block through a KV cache: the inference call pattern."""
    cache = KVCache.for_model(model, x.shape[0], x.shape[3], x.shape[4], x.shape[1], 0, dtype=dtype, device=device)
    outs = []
    with torch.no_grad():
        for f in range(0, x.shape[1], frames_per_block):
            t = torch.full((x.shape[0],), 700.0, device=device)
            outs.append(model.forward_cached(x[:, f:f + frames_per_block], t, ctx, cache, f))
    return torch.cat(outs, 1)


def test_compiled_regions_equal_eager_and_are_shared_by_layers():
    torch.manual_seed(0)
    model = WanModel(CFG, causal=True, num_frame_per_block=1).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)  # Wan zero-inits the head; make the output depend on the input
    x, ctx = torch.randn(1, 3, 16, 4, 6), torch.randn(1, 8, 32)
    eager = stream_blocks(model, x, ctx, torch.device("cpu"), torch.float32, 1)
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(backend="aot_eager")
    try:
        compiled = stream_blocks(model, x, ctx, torch.device("cpu"), torch.float32, 1)
        graphs = counters["stats"]["unique_graphs"]
        merge_compiled = attention._merge_fn is not attention.merge_splits   # split-KV's merge follows the blocks
    finally:
        model.uncompile_blocks()
        torch._dynamo.reset()
    assert merge_compiled and attention._merge_fn is attention.merge_splits
    assert torch.equal(compiled, eager)
    # three regions x one shape: the 4 layers (and the 3 start positions) reuse the same graphs
    assert graphs == 3, f"expected 3 graphs shared by all layers, got {graphs}"
    assert "_ffn" not in vars(model.blocks[0])  # uncompile restores the plain methods


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_projections_write_the_cache_as_attend_would(monkeypatch, frames_per_block):
    """K/V stored by the projections (``CachedCall.write_slots``) must leave the outputs and the cache exactly as
    ``attend``'s copies do, and fall back to them where a call's slots are not one range or a sink frame is written:
    a 5-frame window with 1 sink frame over 6 frames (ring wrap-around included)."""
    from model import kv_cache

    torch.manual_seed(0)
    model = WanModel(CFG, causal=True, num_frame_per_block=frames_per_block).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)
    x, ctx = torch.randn(1, 6, 16, 4, 6), torch.randn(1, 8, 32)
    direct = []
    write_slots = kv_cache.CachedCall.write_slots

    def counted(call, layer):
        slots = write_slots(call, layer)
        if layer == 0:
            direct.append((call.start_frame, slots is not None))
        return slots

    monkeypatch.setattr(kv_cache.CachedCall, "write_slots", counted)
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(kv_cache, "DIRECT_WRITE", enabled)
        direct.clear()
        cache = KVCache.for_model(model, 1, 4, 6, 5, 1)
        outs = []
        with torch.no_grad():
            for f in range(0, 6, frames_per_block):
                t = torch.full((1,), 700.0)
                outs.append(model.forward_cached(x[:, f:f + frames_per_block], t, ctx, cache, f))
        results.append((torch.cat(outs, 1), cache.k.clone(), cache.v.clone(), cache.sink_k.clone(), list(direct)))
    (out0, k0, v0, s0, _), (out1, k1, v1, s1, used) = results
    assert torch.equal(out0, out1) and torch.equal(k0, k1) and torch.equal(v0, v1) and torch.equal(s0, s1)
    # frame 0 writes the sink copy; 2-frame blocks at frames 4-5 sit in slots 4, 1 (two ranges): attend writes those
    expected = [(0, False), (1, True), (2, True), (3, True), (4, True), (5, True)] if frames_per_block == 1 \
        else [(0, False), (2, True), (4, False)]
    assert used == expected


def test_fast_path_is_a_no_op_on_cpu():
    model = WanModel(CFG, causal=True).eval()
    sch = FlowMatchScheduler(shift=5.0)
    pipe = StreamingPipeline(model, None, None, sch, StepSchedule.from_config(sch, [1000, 500]),
                             latent_shape=(16, 4, 6))
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit
    pipe.enable_fast_path()
    assert not pipe.overlap_decode and "_ffn" not in vars(model.blocks[0]) and pipe.graphs is None
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit) == cudnn   # process-wide: untouched
    stream = pipe.open("x", num_latent_frames=3, context=torch.randn(1, 8, 32), decode=False)
    assert stream.loop.model is model and not stream.leased   # the CPU runs the generator itself, no CUDA graphs


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_vae_decoder_is_one_graph_for_every_video(channels_last):
    """The compiled decoder regions must not recompile per call, per chunk size or per video (the first fast_vae
    benchmark did, inside its timed runs), and blocks of equal shapes must share a graph. A counting backend
    records each graph dynamo hands over."""
    torch.manual_seed(0)
    vae = WanVAE.from_config(**TINY_VAE)
    if channels_last:
        vae.to_channels_last()
    z = torch.randn(1, 7, 16, 4, 6)
    eager = vae.decode(z, frames_per_call=1)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    vae.compile_decoder(backend=counting_backend)
    try:
        videos, counts = [], []
        for chunks in ([3, 3, 1], [1, 2, 4]):  # two videos, chunk sizes as the chunk-/frame-wise streams cut them
            stream = vae.stream(frames_per_call=1)
            starts = [sum(chunks[:i]) for i in range(len(chunks))]
            videos.append(torch.cat([stream.decode_chunk(z[:, s:s + n]) for s, n in zip(starts, chunks)], 1))
            counts.append(len(graphs))
    finally:
        vae.compile_decoder(False)
        torch._dynamo.reset()
    # TINY_VAE (widths 32/32/16/8, one residual block + 1 per stage, a mid block of two): residual blocks of 5
    # distinct shapes (mid + stage 0 share one; stage 1's first has a shortcut), 3 upsamplers, the head = 9 graphs
    # for the 14 region calls of a decoder step, once for a video's first call (one frame, no cache) and once for
    # the later calls; none added by the second video
    assert counts == [18, 18], f"graphs after each video: {counts}"
    for video in videos:
        assert torch.equal(video, eager)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_inductor_compiled_streaming_matches_eager_on_gpu():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = WanModel(CFG, causal=True, num_frame_per_block=3).to(dev, torch.bfloat16).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)
    x = torch.randn(1, 6, 16, 8, 8, device=dev, dtype=torch.bfloat16)
    ctx = torch.randn(1, 8, 32, device=dev, dtype=torch.bfloat16)
    eager = stream_blocks(model, x, ctx, dev, torch.bfloat16, 3).float()
    model.compile_blocks()
    try:
        compiled = stream_blocks(model, x, ctx, dev, torch.bfloat16, 3).float()
    finally:
        model.uncompile_blocks()
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel < 2e-2, f"compiled vs eager relative error {rel:.2e} (bf16 rounding expected ~1e-3)"


@cuda
def test_inductor_compiled_vae_decoder_is_as_accurate_as_eager_on_gpu():
    """bf16 compiled and eager decodes round differently (inductor keeps fused elementwise chains in float32), and a
    random VAE amplifies rounding, so both are held against the float32 decode: the compiled one may not be worse."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    exact = WanVAE.from_config(**TINY_VAE).to(dev).to_channels_last()
    vae = WanVAE.from_config(**TINY_VAE).to(dev, torch.bfloat16).to_channels_last()
    vae.model.load_state_dict(exact.model.state_dict())
    z = torch.randn(1, 6, 16, 8, 8, device=dev)
    reference = exact.decode(z, frames_per_call=1)
    eager = vae.decode(z, frames_per_call=1)
    vae.compile_decoder()
    try:
        compiled = vae.decode(z, frames_per_call=1)
    finally:
        vae.compile_decoder(False)

    def rel(x):
        return ((x - reference).norm() / reference.norm()).item()

    # H100, 2026-11-26: eager bf16 2.87e-2, compiled bf16 2.57e-2 relative to float32
    assert rel(compiled) < 1.25 * rel(eager) + 1e-3, f"compiled {rel(compiled):.2e} vs eager {rel(eager):.2e}"


@cuda
def test_overlapped_decode_hands_out_the_same_frames_on_gpu():
    torch.manual_seed(0)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    model = WanModel(CFG, causal=True, num_frame_per_block=3).to(dev, dtype).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)
    vae = WanVAE.from_config(**TINY_VAE).to(dev, dtype)
    sch = FlowMatchScheduler(shift=5.0)
    ctx = torch.randn(1, 8, 32, device=dev, dtype=dtype)

    def run(overlap, uint8=False):
        pipe = StreamingPipeline(model, None, vae, sch, StepSchedule.from_config(sch, [1000, 750, 500, 250]),
                                 latent_shape=(16, 4, 6), device=dev, dtype=dtype, overlap_decode=overlap)
        return list(pipe.open("x", num_latent_frames=9, seed=1, context=ctx, uint8=uint8))

    serial, overlapped = run(False), run(True)
    assert [c.block_index for c in overlapped] == [0, 0, 1, 2]  # the first frame leaves alone
    for a, b in zip(serial, overlapped):
        assert b.frames.device.type == "cpu"  # handed out on the host
        assert torch.equal(a.latents, b.latents)
        assert torch.equal(a.frames.cpu(), b.frames), f"block {a.block_index}: overlapped frames differ"
    # uint8 frames converted on the side stream == the writer's conversion of the float frames
    for a, b in zip(serial, run(True, uint8=True)):
        assert b.frames.dtype == torch.uint8 and b.frames.device.type == "cpu"
        assert torch.equal(b.frames[0], torch.from_numpy(to_uint8_frames(a.frames[0], (-1, 1), "TCHW")))


@cuda
def test_later_videos_reuse_the_decode_memory_on_gpu():
    """Overlapped decodes of every video run on the pipeline's one side stream, so a video after the first needs no
    new device memory (the caching allocator keeps freed blocks per stream)."""
    torch.manual_seed(0)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    model = WanModel(CFG, causal=True, num_frame_per_block=3).to(dev, dtype).eval()
    vae = WanVAE.from_config(**TINY_VAE).to(dev, dtype)
    sch = FlowMatchScheduler(shift=5.0)
    ctx = torch.randn(1, 8, 32, device=dev, dtype=dtype)
    pipe = StreamingPipeline(model, None, vae, sch, StepSchedule.from_config(sch, [1000, 750, 500, 250]),
                             latent_shape=(16, 4, 6), device=dev, dtype=dtype, overlap_decode=True)
    mallocs = []
    for _ in range(3):
        list(pipe.open("x", num_latent_frames=9, seed=1, context=ctx, uint8=True))
        torch.cuda.synchronize()
        mallocs.append(torch.cuda.memory_stats()["num_device_alloc"])
    assert mallocs[2] == mallocs[1] == mallocs[0], f"cudaMalloc calls after each video: {mallocs}"


def test_fused_qkv_equals_separate_products_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = WanModel(CFG, causal=True, num_frame_per_block=1).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)
    x, ctx = torch.randn(1, 3, 16, 4, 6), torch.randn(1, 8, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = stream_blocks(model, x, ctx, torch.device("cpu"), torch.float32, 1)
    model.fuse_qkv()
    fused = stream_blocks(model, x, ctx, torch.device("cpu"), torch.float32, 1)
    assert (fused - plain).abs().max() < 1e-5  # float32 GEMM blocking may differ; values agree to rounding
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # loading new weights into the (view) parameters updates the fused product as well
    other = WanModel(CFG, causal=True, num_frame_per_block=1).eval()
    other.load_state_dict(before)
    with torch.no_grad():
        for b in other.blocks:
            b.self_attn.k.weight.mul_(0.5)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.blocks[0].self_attn.fused_qkv[0][CFG.dim:2 * CFG.dim], other.blocks[0].self_attn.k.weight)
    assert (stream_blocks(model, x, ctx, torch.device("cpu"), torch.float32, 1)
            - stream_blocks(other, x, ctx, torch.device("cpu"), torch.float32, 1)).abs().max() < 1e-5
