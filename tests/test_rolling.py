"""Rolling Forcing (BlockLoop.rolling) against a step-by-step recomputation of the published algorithm
(long_video/pipeline/rolling_forcing_inference.py with long_video/wan/modules/causal_model.py's cached attention),
on a tiny model in float32.

The recomputation follows the published loop literally: every window (first and last ones partial) builds its
input from the noisy cache and fresh noise, takes its timesteps from the shared clean-to-noisy table, runs one
forward in which the window's blocks see each other in both directions, the anchor block re-positioned just before
the "working cache" of the last ``span - window - anchor`` clean frames, re-noises each unfinished block to its next
step, and re-caches the window's OLDEST block by a context pass that sees the last ``span`` clean frames -- in every
window, also the first ones, where block 0 is cached again and again. Attention is tests/explicit_attention.py
(keys kept unrotated, rotated to absolute positions in float64, no cache object).
"""

import pytest
import torch

from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from pipeline.causal import BlockLoop, CacheViews, Guidance, StepSchedule, rolling_windows
from tests import explicit_attention as ref
from tests.tiny import TINY, recorded_noise, rel, tiny_model

TOL = 1e-5
CFG = TINY


pytestmark = pytest.mark.usefixtures("single_thread")


def make(n):
    return tiny_model(num_frame_per_block=n)


def published(model, sch, steps, noise, ctx, span, drawn):
    """The published rolling loop, step by step (see the module docstring); returns the output latents."""
    n = model.num_frame_per_block
    num_blocks = noise.shape[1] // n
    S = len(steps)
    shared = [t for t in reversed(steps) for _ in range(n)]        # clean -> noisy, one entry per frame
    noisy = torch.zeros_like(noise)
    output = torch.zeros_like(noise)
    clean: dict[int, ref.Frame] = {}                               # frame -> memory of its last context pass
    eps = iter(drawn)
    for k in range(num_blocks + S - 1):
        s, e = max(0, k - S + 1), min(num_blocks - 1, k)
        a, b = s * n, (e + 1) * n
        q = b - a
        if q == S * n or a == 0:
            x = torch.cat([noisy[:, a:b - n], noise[:, b - n:b]], 1)
            t = shared if q == S * n else shared[-q:]
        else:
            x, t = noisy[:, a:b], shared[:q]
        t = torch.tensor([t])
        if a == 0:                                                 # nothing cached yet: the window alone
            memory = []
        else:
            working = list(range(max(n, a - (span - q - n)), a))   # the working cache, anchor excluded
            at = (working[0] if working else a) - n                # the anchor sits right before it
            memory = [(at + i, clean[i]) for i in range(n)] + [(f, clean[f]) for f in working]
        flow, _ = ref.call(model, x, t, ctx, list(range(a, b)), memory)
        x0 = sch.flow_to_x0(flow, x, t)
        output[:, a:b] = x0
        for blk in range(s, e + 1):
            level = t[0, (blk - s) * n].item()                     # the published code finds the step by value
            j = min(range(S), key=lambda i: abs(steps[i] - level))
            if j < S - 1:
                part = x0[:, (blk - s) * n:(blk - s + 1) * n]
                noisy[:, blk * n:(blk + 1) * n] = sch.add_noise(part, next(eps), torch.full((1, n), steps[j + 1]))
        # context pass of the oldest block at t = 0: the last `span` frames, itself included
        history = [(f, clean[f]) for f in range(max(0, a + n - span), a)]
        _, own = ref.call(model, x0[:, :n], torch.zeros(1, n), ctx, list(range(a, a + n)), history)
        clean.update({a + i: fr for i, fr in enumerate(own)})
    return output


@pytest.mark.parametrize("n,steps,span,blocks", [(3, [1000, 750, 500, 250], 21, 10), (1, [1000, 600, 300], 6, 12),
                                                  (3, [1000, 750, 500, 250], 15, 4)])
@torch.no_grad()
def test_rolling_equals_published_recomputation(n, steps, span, blocks):
    model, sch = make(n), FlowMatchScheduler(shift=5.0)
    sched = StepSchedule.from_config(sch, steps)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, blocks * n, 16, 2, 2, generator=g)
    ctx = torch.randn(1, 5, CFG.text_dim, generator=g)
    fn, drawn = recorded_noise(2)
    cache = KVCache.for_model(model, 1, 2, 2, capacity_frames=span + n, sink_frames=n)
    loop = BlockLoop(model, sch, sched, Guidance(ctx), cache, noise_fn=fn, views=CacheViews.rolling(span))
    results = list(loop.rolling(lambda start, size: noise[:, start:start + size], num_blocks=blocks))
    finals = [r.final for r in results if r.final is not None]
    assert [f for f, _ in finals] == list(range(0, blocks * n, n))     # each block leaves once, in order
    ours = torch.cat([x0 for _, x0 in finals], 1)
    assert rel(ours, published(model, sch, sched.timesteps, noise, ctx, span, drawn)) < TOL


def test_windows_are_the_published_ones():
    windows = list(rolling_windows(4, 6))
    assert [(w.first, w.last) for w in windows] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (2, 5), (3, 5), (4, 5),
                                                    (5, 5)]
    assert [[w.index - b for b in w.blocks] for w in windows[3:5]] == [[3, 2, 1, 0], [3, 2, 1, 0]]
    endless = rolling_windows(4)
    assert [next(endless) for _ in range(6)][-1] == (5, 2, 5)


# ----------------------------------------------------------------------------------------------------------------
# training: the rolling rollout and the Rolling Forcing DMD objective


def test_rolling_rollout_takes_each_block_from_its_phase_window():
    """Each block's latents are its prediction in the window k = phase (mod S) that holds it, and only windows that
    end after grad_from_frame carry gradients."""
    from pipeline.rollout import self_forcing_rollout

    n, steps, blocks, span = 1, [1000, 750, 500, 250], 9, 6
    model, sch = make(n).train(), FlowMatchScheduler(shift=5.0)
    sched = StepSchedule.from_config(sch, steps)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, blocks, 16, 2, 2, generator=g)
    ctx = torch.randn(1, 5, CFG.text_dim, generator=g)
    for phase in range(4):
        fn, drawn = recorded_noise(2)
        with torch.no_grad():
            cache = KVCache.for_model(model, 1, 2, 2, capacity_frames=blocks, sink_frames=n)
            loop = BlockLoop(model, sch, sched, Guidance(ctx), cache, noise_fn=fn, views=CacheViews.rolling(span))
            want = torch.cat([r.x0 for r in loop.rolling(lambda f, m: noise[:, f:f + m], num_blocks=blocks)
                              if r.window.index % 4 == phase], 1)
        replay = iter(drawn)
        out = self_forcing_rollout(model, sch, sched, ctx, blocks, latent_shape=(16, 2, 2), rolling=(span, n),
                                   phase=phase, grad_from_frame=4, noise=noise, noise_fn=lambda like: next(replay))
        assert out.denoised_timestep_from is None and rel(out.latents.detach(), want) < TOL
        weight = model.blocks[0].self_attn.k.weight
        for f in range(blocks):
            grad, = torch.autograd.grad(out.latents[:, f].sum(), weight, retain_graph=True, allow_unused=True)
            window_end = next(k for k in range(phase, blocks + 4, 4) if k >= f) + 1   # blocks of one frame
            assert (grad is not None and grad.abs().sum() > 0) == (min(window_end, blocks) > 4), (phase, f)


@pytest.fixture(scope="module")
def rolling_dmd(tmp_path_factory):
    """A Rolling Forcing DMD objective on tiny folders: frame-wise 4 steps, clip 3 frames, rollouts of 3 to 5."""
    from pathlib import Path

    from toy.folders import write_tiny_wan_folder
    from trainer.dmd import DMDObjective
    from utils.config import load_config

    root = tmp_path_factory.mktemp("rolling_dmd")
    for name, seed in (("gen", 1), ("teacher", 2)):
        write_tiny_wan_folder(root / "wan" / name, seed=seed)
    (root / "prompts.txt").write_text("a red circle moving left\na blue square moving up\n")
    configs = Path(__file__).resolve().parent.parent / "configs"
    cfg = load_config(configs / "causal_forcing_dmd_framewise.yaml", [
        f"wan_models_dir={root / 'wan'}", "generator_name=gen", "real_name=teacher", "fake_name=teacher",
        "text_encoder_name=teacher", "generator_ckpt=null", f"data_path={root / 'prompts.txt'}",
        "image_or_video_shape=[1,3,16,2,2]", "rolling_forcing=true", "num_training_frames=5",
        "model_kwargs.local_attn_size=5", "gradient_checkpointing=false", "mixed_precision=false"])
    obj = DMDObjective(cfg)
    obj.attach(obj.build_networks(torch.device("cpu")))
    return obj


@pytest.mark.parametrize("draws", [(5, 1, 2), (5, 0, 0), (3, 1, 0), (4, 0, 0)])
def test_rolling_dmd_scores_the_last_clip(rolling_dmd, draws):
    """Both rollouts, shorter and longer than the clip: the DMD and critic losses see the last 3 frames, the first
    re-encoded from the decoded frames before it; gradients reach only the generator, and when the rollout was
    longer, the clip's first block takes no part in the DMD loss."""
    obj = rolling_dmd
    gen, critic = obj.networks.trainable["generator"], obj.networks.trainable["critic"]
    context = obj.encode({"prompts": ["a red circle moving left"]})
    torch.manual_seed(0)
    rollout = obj.rolling_forcing_rollout(context, grad=True, draws=draws)
    assert rollout.latents.shape == (1, 3, 16, 2, 2) and rollout.first_trained_frame == (1 if draws[0] > 3 else 0)
    loss, _ = obj.distribution_matching_loss(rollout.latents, context, rollout=rollout,
                                             first_frame=rollout.first_trained_frame)
    for net in (gen, critic):
        net.zero_grad(set_to_none=True)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None for p in critic.parameters())
    with torch.no_grad():
        critic_loss, _ = obj.critic_loss(obj.rolling_forcing_rollout(context, grad=False, draws=draws).latents,
                                         context)
    assert torch.isfinite(critic_loss)


def test_longer_rollout_clip_starts_with_the_reencoded_frame(rolling_dmd):
    latents = torch.randn(1, 5, 16, 2, 2)
    clip = rolling_dmd._last_clip(latents, 3)
    vae = rolling_dmd.vae
    with torch.no_grad():
        first = vae.encode(vae.decode(latents[:, :3])[:, -1:].transpose(1, 2))
    assert torch.equal(clip[:, 1:], latents[:, 3:]) and rel(clip[:, :1], first) < TOL
