"""Stage 1 (trainer/diffusion.py) and the video-encoding tool (app/encode_videos.py) on tiny models, CPU.

Training data are synthetic captioned clips (toy/world.py) turned into latents by a fixed linear stand-in for the
VAE (first frame + means of 4-frame groups, 8x8 average pooling, a random 3 -> 16 channel lift), so a latent LMDB of a
few hundred clips costs well under a second. The training test runs the shared loop (trainer/loop.py).

Captions in samples (issue 5; measured on a shared 2-core CPU, one thread, 64 samples from noise with the multi-step
Euler sampler, 20 steps; "direction" = move of the latent energy centroid, chance 1/4):

* Why the captioned direction stayed at chance (the earlier 300-600-step runs here: 0.18-0.24 with shuffled
  direction words): the direction never reached the model. The ``world`` fixture's tokenizer converges to 41
  mostly one-character pieces, a caption takes 19-27 tokens, and TINY_DIT keeps ``text_len = 16``, so every caption
  is cut after "a <colour> <shape> moving": captions that differ only in direction (or speed) give *identical*
  contexts. ``caption_world`` uses the one-piece-per-word toy tokenizer (7 tokens); test_caption_words_reach_the_
  generator guards this.
* With the direction visible (text_len 32, or word pieces) it is still learned slowly: at 300-900 steps every variant
  stayed at 0.14-0.34 -- caption dropout 0.2 with CFG 1-6 against "", one colour and shape, fast only, no
  distractors, 2 / 3 / 5 latent frames, lr 1e-2, 4 layers (0.34 / 0.38 at 900 steps), patch 1x1 (0.33 / 0.34),
  noise-augmented context up to t = 900 / 999, timestep shift 2, latents scaled by 1/4 or 1/8, uniform loss weights,
  fixed random word vectors instead of the T5. Under teacher forcing the caption tells only the first move (latent
  frame 1 given the clean frame 0; later frames read the motion from their clean context), and the start position
  already rules out half the directions (the object stays inside the frame), so the caption -> shift map gets little
  gradient. It emerges with length, unreliably: 3 latent frames, one colour, text_len 32, CFG 1 / 4: 0.25 / 0.27 at
  600 steps, 0.30 / 0.34 at 1200, 0.38 / 0.39 at 1800, 0.47 / 0.55 at 2400, 0.44 / 0.47 (CFG 3) at 3000; another
  seed: 0.25 at 1500; ``caption_world`` (4 colours): 17/64 / 22/64 (p = 0.06) at 2400. So the direction is not
  asserted for these from-scratch runs: none of CI size (~35-80 ms per step here) learns it reliably. Started, as
  the real Stage 1 is, from a base that knows the motion (the shipped toy base), 300 teacher-forcing steps do learn
  it: test_teacher_forcing_from_the_toy_base_learns_the_captioned_direction asserts it (23/32 videos).
* A caption word that maps to a *global* property is learned at once: 300 steps with caption dropout 0.2 put the
  captioned colour on 60/64 samples with CFG 1 and 64/64 with CFG 4 (chance 16/64; direction 14/64 at that point;
  150 steps: 24/64 and 30/64); test_samples_follow_the_caption asserts it (binomial p < 0.01), 18-56 s here.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.encode_videos import build_parser, encode_videos_to_lmdb, list_captioned_videos, main
from model.vae import WanVAE
from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline
from toy import world as S
from toy.folders import toy_words, write_tiny_wan_folder
from trainer.diffusion import DRAW_STREAM, IMAGE_STREAM, DiffusionObjective
from trainer.loop import Trainer
from utils.config import Config
from utils.datasets import LatentLMDBDataset
from utils.distributed import close_distributed
from utils.errors import ConfigError, DataError
from utils.video import write_mp4

PIXELS = dict(num_frames=17, height=64, width=64)   # synthetic clips
LATENT = (5, 16, 8, 8)                              # [F, C, h, w] after 4x temporal and 8x spatial compression


class LinearToyVAE:
    """pixels ``[B, 3, T, H, W]`` in [-1, 1] -> ``[B, 1 + (T-1)/4, 16, H/8, W/8]``: linear, with a VAE's shapes."""

    device = torch.device("cpu")

    def __init__(self, channels: int = 16, scale: float = 8.0, seed: int = 0):
        # Orthonormal columns times `scale`: latents of std ~0.5, the order of a normalised Wan latent.
        q, _ = torch.linalg.qr(torch.randn(channels, 3, generator=torch.Generator().manual_seed(seed)))
        self.lift = q * scale                                     # [16, 3]
        self.background = torch.tensor(S.BACKGROUND).view(1, 3, 1, 1, 1) / 127.5 - 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        frames = torch.cat([pixels[:, :, :1], pixels[:, :, 1:].unflatten(2, (-1, 4)).mean(3)], 2)
        frames = F.avg_pool3d(frames - self.background, (1, 8, 8))                   # background -> 0
        return torch.einsum("kc,bcfhw->bfkhw", self.lift, frames)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a tiny Wan model folder (tokenizer trained on every synthetic caption) and train / held-out
    latent LMDBs."""
    root = tmp_path_factory.mktemp("stage1")
    write_tiny_wan_folder(root / "wan" / "tiny", sentences=[S.format_caption(c) for c in S.all_combinations()])
    train, heldout = S.make_split(256, 64, seed=1, **PIXELS)   # held-out clips use unseen attribute combinations
    encode_videos_to_lmdb(train, LinearToyVAE(), root / "train", batch_size=16)
    encode_videos_to_lmdb(heldout, LinearToyVAE(), root / "heldout", batch_size=16)
    return root


def make_config(world, **overrides) -> Config:
    values = dict(trainer="diffusion", data_path=str(world / "train"), wan_models_dir=str(world / "wan"),
                  generator_name="tiny", text_encoder_name="tiny", image_or_video_shape=[1, *LATENT], batch_size=4,
                  teacher_forcing=True, mixed_precision=False, gradient_checkpointing=False)
    return Config(**{**values, **overrides})


def build(world, **overrides):
    objective = DiffusionObjective(make_config(world, **overrides), num_workers=0)
    objective.attach(objective.build_networks(torch.device("cpu")))
    return objective, objective.networks.trainable["generator"]


def heldout(world, n=None):
    ds = LatentLMDBDataset(world / "heldout")
    rows = [ds[i] for i in range(n or len(ds))]
    return torch.stack([r["clean_latent"] for r in rows]), [r["prompts"] for r in rows]


# ------------------------------------------------------------------------------------------------ loss and gradients

MODES = {
    "teacher_forcing": dict(teacher_forcing=True),
    "teacher_forcing_noise_aug": dict(teacher_forcing=True, noise_augmentation_max_timestep=250),
    "diffusion_forcing": dict(teacher_forcing=False),
    "bidirectional": dict(causal=False, teacher_forcing=False),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_loss_finite_and_gradients_reach_generator(world, mode):
    objective, generator = build(world, **MODES[mode])
    assert generator.causal == objective.cfg.causal
    batch = next(objective.data(rank=0, world_size=1, seed=0))
    assert batch["clean_latent"].shape == (4, *LATENT) and len(batch["prompts"]) == 4
    loss, metrics = objective.loss("generator", batch, step=0)
    assert loss.dim() == 0 and torch.isfinite(loss) and metrics["loss"] == loss.detach()
    loss.backward()
    for name in ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "blocks.1.cross_attn.k.weight",
                 "text_embedding.0.weight", "head.head.weight"):
        grad = generator.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in objective.networks.frozen["text_encoder"].parameters())

    draw = objective.draw(batch["clean_latent"])
    if mode == "bidirectional":  # one timestep per sample
        assert (draw.t == draw.t[:, :1]).all()
    else:
        assert not (draw.t == draw.t[:, :1]).all()  # independent per (1-frame) block
    if mode == "teacher_forcing_noise_aug":
        assert draw.clean_t is not None and (draw.clean_t <= 250).all() and (draw.clean_t > 0).all()
        assert not torch.equal(draw.clean_noise, draw.noise)  # its own noise (the reference reused eps)
    else:
        assert draw.clean_t is None


@pytest.mark.parametrize("mode", list(MODES))
def test_caption_dropout_reaches_the_loss(world, mode):
    """``caption_dropout: 1`` trains every sample on the empty caption in every mode: the loss equals the loss of the
    same batch, drawn from the same RNG state, with its prompts replaced by "" (exactly: same tensors, same ops)."""
    objective, generator = build(world, caption_dropout=1.0, **MODES[mode])
    batch = next(objective.data(rank=0, world_size=1, seed=0))
    seen = []
    encode = objective.encode_prompts
    objective.encode_prompts = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    torch.manual_seed(3)
    loss, _ = objective.loss("generator", batch, step=0)
    assert seen == [[""] * len(batch["prompts"])] and all(batch["prompts"])
    torch.manual_seed(3)
    ids = batch.get("sample_id")
    objective.drop_captions(batch["prompts"], ids)   # the same draws as inside loss()
    draw = objective.draw(batch["clean_latent"], ids)
    expected, _ = objective.denoising_loss(generator, batch["clean_latent"], encode([""] * len(seen[0])), draw)
    assert torch.equal(loss, expected)


def test_caption_dropout_rate_and_determinism(world):
    prompts = [f"caption {i}" for i in range(4000)]

    ids = torch.arange(len(prompts))

    def dropped(p, seed=0, sample_ids=None):
        torch.manual_seed(seed)
        out = DiffusionObjective(make_config(world, caption_dropout=p)).drop_captions(prompts, sample_ids)
        assert [o for o in out if o] == [q for q, o in zip(prompts, out) if o]   # kept captions are unchanged
        return [o == "" for o in out]

    for sample_ids in (None, ids):   # the global RNG (no sample ids) or per-sample generators (the loop's batches)
        assert not any(dropped(0.0, sample_ids=sample_ids)) and all(dropped(1.0, sample_ids=sample_ids))
        for p in (0.1, 0.5):
            frac = sum(dropped(p, sample_ids=sample_ids)) / len(prompts)
            # binomial standard deviation <= 0.0080 at n = 4000: 4 sigma
            assert abs(frac - p) < 0.032, (p, frac, sample_ids is None)
    assert dropped(0.3, seed=1) == dropped(0.3, seed=1) != dropped(0.3, seed=2)   # a function of the RNG state
    assert dropped(0.3, seed=1, sample_ids=ids) == dropped(0.3, seed=2, sample_ids=ids)   # ... or of the sample ids
    objective = DiffusionObjective(make_config(world, caption_dropout=0.0))
    state = torch.get_rng_state()
    objective.drop_captions(prompts)
    assert torch.equal(torch.get_rng_state(), state)   # p = 0 draws nothing: runs without dropout are unchanged
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="caption_dropout"):
            make_config(world, caption_dropout=bad)


def reference_grid(num_steps=1000, shift=5.0):
    """Shifted training grid and its loss weights, float64, from the formulas of training.md §2.3."""
    raw = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    sigmas = shift * raw / (1 + (shift - 1) * raw)
    t = 1000 * sigmas
    w = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    w = w - w.min()
    return t, sigmas, w * num_steps / w.sum()


@pytest.mark.parametrize("weighting,first", [("gaussian", 1.0), ("uniform", 1.0), ("uniform", 2.5)])
def test_teacher_forcing_loss_equals_independent_recomputation(world, weighting, first):
    objective, generator = build(world, loss_weighting=weighting, first_frame_loss_weight=first)
    x0, prompts = heldout(world, 4)
    context = objective.encode_prompts(prompts)
    torch.manual_seed(7)
    loss, _ = objective.loss("generator", {"clean_latent": x0, "prompts": prompts}, step=0)
    torch.manual_seed(7)
    draw = objective.draw(x0)
    # t is a float32 grid value, never rounded to bf16 (the reference's accident)
    grid_t, sigmas, weights = reference_grid()
    index = (grid_t.view(1, 1, -1) - draw.t.double().unsqueeze(-1)).abs().argmin(-1)
    assert torch.equal(grid_t[index].float(), draw.t)
    assert not torch.equal(draw.t.bfloat16().float(), draw.t)

    sigma = sigmas[index].view(*index.shape, 1, 1, 1)
    x_t = (1 - sigma) * x0.double() + sigma * draw.noise.double()
    with torch.no_grad():
        flow = generator.forward_teacher_forcing(x_t.float(), draw.t, context, clean_x=x0).double()
    per_frame = (flow - (draw.noise.double() - x0.double())).pow(2).mean(dim=(2, 3, 4))
    frames = torch.ones(per_frame.shape[1], dtype=torch.float64)
    frames[0] = first                                   # frame 0's weight, then all rescaled to mean 1
    frames = frames / frames.mean()
    expected = ((weights[index] if weighting == "gaussian" else 1.0) * per_frame * frames).mean()
    # float32 model on float32 inputs vs a float64 recomputation around the same forward: 1e-5 relative
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item(), (loss.item(), expected.item())


def test_image_term_adds_frame_zero_denoised_alone(world):
    """image_loss_weight: the loss is the clip's plus w x latent frame 0's, denoised as a one-frame sample with draws
    of its own stream, recomputed here by hand (flow-matching target, uniform weights) from the same generator."""
    w = 0.7
    objective, generator = build(world, causal=False, teacher_forcing=False, loss_weighting="uniform",
                                 image_loss_weight=w)
    x0, prompts = heldout(world, 4)
    ids = torch.arange(10, 14)
    batch = {"clean_latent": x0, "prompts": prompts, "sample_id": ids}
    loss, metrics = objective.loss("generator", batch, step=0)
    context = objective.encode_prompts(prompts)     # caption_dropout 0: the captions as given

    def by_hand(x, stream):
        draw = objective.draw(x, ids, stream)
        sigma = (draw.t.double() / 1000).view(*draw.t.shape, 1, 1, 1)   # the grid's sigma = t / 1000
        x_t = (1 - sigma) * x.double() + sigma * draw.noise.double()
        with torch.no_grad():
            flow = generator(x_t.float(), draw.t, context).double()
        return (flow - (draw.noise.double() - x.double())).pow(2).mean(), draw

    video, video_draw = by_hand(x0, 0)
    image, image_draw = by_hand(x0[:, :1], 2)
    assert image_draw.noise.shape == (4, 1, *LATENT[1:]) and not torch.equal(image_draw.noise, video_draw.noise[:, :1])
    expected = video + w * image
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item(), (loss.item(), expected.item())
    assert abs(metrics["image_loss"].item() - image.item()) <= 1e-5 * image.item()
    # off by default: the reference's loss is the clip's alone
    plain, _ = build(world, causal=False, teacher_forcing=False, loss_weighting="uniform")
    plain.networks.trainable["generator"].load_state_dict(generator.state_dict())
    alone, _ = plain.loss("generator", batch, step=0)
    assert abs(alone.item() - video.item()) <= 1e-5 * video.item()
    with pytest.raises(ConfigError, match="image_loss_weight"):
        DiffusionObjective(make_config(world, image_loss_weight=1.0))          # causal
    with pytest.raises(ConfigError, match="image_loss_weight"):
        make_config(world, trainer="ode", image_loss_weight=1.0)               # another stage would ignore it
    with pytest.raises(ConfigError, match="image_loss_weight"):
        DiffusionObjective(make_config(world, causal=False, teacher_forcing=False, image_loss_weight=-1.0))


def test_block_timesteps_phases_and_config_checks(world):
    objective = DiffusionObjective(make_config(world, num_frame_per_block=2, independent_first_frame=True,
                                               lr=1e-4, beta1=0.5, max_grad_norm_generator=2.0))
    (phase,) = objective.phases()
    assert (phase.name, phase.lr, phase.betas, phase.max_grad_norm, phase.ema) == ("generator", 1e-4, (0.5, 0.999),
                                                                                   2.0, False)
    assert DiffusionObjective(make_config(world, ema_weight=0.99)).phases()[0].ema
    t = objective.draw(torch.zeros(64, *LATENT)).t
    assert torch.equal(t[:, 1], t[:, 2]) and torch.equal(t[:, 3], t[:, 4])   # blocks [0], [1, 2], [3, 4]
    assert not torch.equal(t[:, 0], t[:, 1]) and not torch.equal(t[:, 1], t[:, 3])
    with pytest.raises(ConfigError, match="teacher_forcing"):
        DiffusionObjective(make_config(world, causal=False, teacher_forcing=True))
    with pytest.raises(ConfigError, match="loss_weighting"):
        DiffusionObjective(make_config(world, loss_weighting="sigmoid"))
    with pytest.raises(ConfigError, match="first_frame_loss_weight"):
        DiffusionObjective(make_config(world, first_frame_loss_weight=0))
    with pytest.raises(ConfigError, match="needs teacher_forcing"):
        DiffusionObjective(make_config(world, teacher_forcing=False, noise_augmentation_max_timestep=100))


def test_data_of_another_shape_than_the_config_is_refused(world):
    """The generator accepts any clip length, so a config and data that disagree would silently train on other clips
    than configured: refused before the first step, naming both shapes."""
    frames, *rest = LATENT
    objective = DiffusionObjective(make_config(world, image_or_video_shape=[1, frames + 3, *rest]), num_workers=0)
    with pytest.raises(DataError, match=rf"latents are \[F, C, H, W\] = \[{frames}, .* but the config's "
                                        rf"image_or_video_shape\[1:\] is \[{frames + 3}, "):
        objective.data(rank=0, world_size=1, seed=0)


def test_data_resumes_at_the_same_sample(world):
    def make():
        return DiffusionObjective(make_config(world, max_pair=20, batch_size=8), num_workers=0)

    first = make()
    batches = first.data(rank=0, world_size=1, seed=3)
    seen = [next(batches) for _ in range(4)]           # 32 samples: one epoch of 20 and 12 of the next
    epoch0 = torch.cat([b["clean_latent"] for b in seen])[:20].flatten(1)
    assert len({tuple(row.tolist()) for row in epoch0}) == 20   # a permutation: nothing dropped or repeated
    state = first.data_state()
    expected = [next(batches) for _ in range(3)]
    resumed = make()
    resumed.load_data_state(state)                     # before data(), as a loop resuming from a checkpoint does
    got = resumed.data(rank=0, world_size=1, seed=3)
    for a in expected:
        b = next(got)
        assert a["prompts"] == b["prompts"] and torch.equal(a["clean_latent"], b["clean_latent"])


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", [dict(noise_augmentation_max_timestep=250),                    # context noise
                                  dict(causal=False, teacher_forcing=False, image_loss_weight=1.0)])  # image draws
def test_batches_bring_the_draws_the_objective_makes(world, num_workers, mode):
    """With draws_in_workers the loop's batches carry every per-sample draw, made where the sample was read (a
    DataLoader worker): the same noise, timesteps, context noise, image draws and caption drops as the objective
    draws in-process for those sample ids, and hence the same loss. Without it, the batches bring none."""
    without = DiffusionObjective(make_config(world, batch_size=6, **mode), num_workers=0)
    assert "draws" not in next(without.data(rank=0, world_size=1, seed=5))
    cfg = make_config(world, batch_size=6, caption_dropout=0.5, draws_in_workers=True, **mode)
    objective = DiffusionObjective(cfg, num_workers=num_workers)
    objective.attach(objective.build_networks(torch.device("cpu")))
    batches = objective.data(rank=0, world_size=1, seed=5)
    next(batches)
    batch = next(batches)
    ids = batch["sample_id"]
    assert ids.tolist() == list(range(6, 12))
    x0, made = batch["clean_latent"], batch["draws"]
    streams = [(DRAW_STREAM, x0, "video")] + ([(IMAGE_STREAM, x0[:, :1], "image")] if cfg.image_loss_weight else [])
    assert set(made) == {"caption_dropped"} | {key for _, _, key in streams}
    for stream, clip, key in streams:
        expected = objective.draw(clip, ids, stream).tensors()
        assert set(made[key]) == set(expected)
        for name, value in expected.items():
            assert torch.equal(made[key][name], value), (key, name)
    assert ("clean_noise" in made["video"]) == cfg.teacher_forcing
    dropped = ["" if d else p for p, d in zip(batch["prompts"], made["caption_dropped"].tolist())]
    assert dropped == objective.drop_captions(batch["prompts"], ids) and "" in dropped and set(dropped) != {""}
    in_process = {k: v for k, v in batch.items() if k != "draws"}
    assert torch.equal(objective.loss("generator", batch, 0)[0], objective.loss("generator", in_process, 0)[0])


def test_kill_and_resume_equals_the_uninterrupted_run(world, tmp_path, one_thread):
    """Killed during step 3 and resumed from the step-2 checkpoint: the same losses as an uninterrupted run, with
    caption dropout and context noise on (every kind of per-sample draw, made by the one worker that prefetches
    ahead of the kill), two micro-batches per step."""
    from tests._resume import assert_same_losses, kill_resume_losses

    cfg = make_config(world, batch_size=2, total_batch_size=4, lr=1e-3, caption_dropout=0.3,
                      noise_augmentation_max_timestep=250, sharding_strategy="full", draws_in_workers=True)
    make = lambda cfg: DiffusionObjective(cfg, num_workers=1)   # noqa: E731
    assert_same_losses(*kill_resume_losses(make, cfg, tmp_path))


def test_compiled_blocks_train_as_the_eager_model(world, tmp_path, monkeypatch):
    """``compile: true`` (every transformer block compiled in place; the toy base's option on a GPU) trains as the
    eager model does: three steps of a bidirectional base with the frame-0 image term (clips and one-frame samples:
    two input shapes, one recompilation) give the same losses, and the parameter names checkpoints store are the
    eager model's (no ``_orig_mod.``). On the CPU the blocks are traced with the ``aot_eager`` backend (graph capture,
    functionalisation and the captured backward, without inductor's code generation), as in tests/test_fast_path.py."""
    from tests._resume import _record, assert_same_losses

    real_compile = torch.nn.Module.compile
    compiled = []

    def compile_aot_eager(module, *args, **kwargs):
        compiled.append(module)
        return real_compile(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    runs = {}
    try:
        for flag in (False, True):
            cfg = make_config(world, causal=False, teacher_forcing=False, image_loss_weight=1.0, lr=1e-3, compile=flag,
                              logdir=str(tmp_path / f"compile_{flag}"), no_save=True, max_steps=3, log_every=1)
            objective = DiffusionObjective(cfg, num_workers=0)
            losses = _record(objective, None)
            Trainer(cfg, objective).train()
            close_distributed()
            runs[flag] = losses, list(objective.networks.trainable["generator"].state_dict())
    finally:
        torch._dynamo.reset()   # no compiled code of these blocks stays behind for later tests
    blocks = runs[True][1]
    assert len(compiled) == sum(1 for k in blocks if k.endswith("self_attn.q.weight")) > 0   # every block, once
    assert blocks == runs[False][1] and not any("_orig_mod" in k for k in blocks)
    assert sorted(runs[True][0]) == [("generator", step) for step in range(3)]
    assert_same_losses(runs[False][0], runs[True][0], rel=1e-5)


# ------------------------------------------------------------------------------------------------ training on the toy

@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread (two threads on the shared 2-core CPU under load are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_teacher_forcing_training_lowers_heldout_loss(world, tmp_path, one_thread):
    """200 steps of batch 8 on 256 clips through the shared loop (FSDP2 over one gloo rank, AdamW, clipping) and the
    objective's own data iterator and loss (~8 s on an idle 2-core CPU): the loss on held-out clips (unseen attribute
    combinations, fixed noise and timesteps) falls."""
    cfg = make_config(world, batch_size=8, lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, sharding_strategy="full",
                      logdir=str(tmp_path), no_save=True, max_steps=200, log_every=50)
    objective = DiffusionObjective(cfg, num_workers=0)
    trainer = Trainer(cfg, objective)
    try:
        assert trainer.setup() == 0
        generator = objective.networks.trainable["generator"]
        x0, prompts = heldout(world)
        context = objective.encode_prompts(prompts)
        draws = [objective.draw(x0) for _ in range(2)]

        def heldout_loss():
            with torch.no_grad():
                return sum(objective.denoising_loss(generator, x0, context, d)[0].item() for d in draws) / len(draws)

        start = heldout_loss()
        for step in range(cfg.max_steps):
            trainer.train_step(step)
        end = heldout_loss()
    finally:
        close_distributed()
    # measured 1.50 -> 0.37 (other noise seeds: 1.38-1.44 -> 0.33-0.37)
    assert end < 0.4 * start, f"held-out loss {start:.3f} -> {end:.3f} after {cfg.max_steps} steps"


# ------------------------------------------------------------------------------------------------ captions in samples

# A simpler configuration of the same synthetic data, where one caption word maps to one visible property of a
# latent: circles moving fast, no distractors, four colours, 9 frames -> latents [3, 16, 8, 8].
CAPTION_PIXELS = dict(num_frames=9, height=64, width=64)
CAPTION_COLORS = ("red", "green", "blue", "yellow")
DIRECTIONS = tuple(S.DIRECTIONS)


def simple_clips(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    combos = [c for c in S.all_combinations()
              if c["color"] in CAPTION_COLORS and c["shape"] == "circle" and c["speed"] == "fast"]
    clips = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        attrs = S.sample_attributes(rng, combos)
        clips.append((S.format_caption(attrs), S.make_video(attrs, rng=rng, num_distractors=0, **CAPTION_PIXELS)))
    return clips


@pytest.fixture(scope="module")
def caption_world(tmp_path_factory):
    """Tiny Wan folder whose tokenizer has one piece per caption word, and 256 simple clips as latents."""
    root = tmp_path_factory.mktemp("captions")
    write_tiny_wan_folder(root / "wan" / "tiny", sentences=[S.format_caption(c) for c in S.all_combinations()],
                          words=toy_words())
    encode_videos_to_lmdb(simple_clips(256, seed=2), LinearToyVAE(), root / "train", batch_size=32)
    return root


def train_with_caption_dropout(world, steps: int, caption_dropout: float = 0.2):
    """Teacher-forcing training of the tiny causal model (AdamW, clipping; the objective's own data and loss)."""
    objective, generator = build(world, image_or_video_shape=[1, 3, 16, 8, 8], batch_size=8, lr=3e-3,
                                 caption_dropout=caption_dropout, negative_prompt="", seed=0)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    batches = objective.data(rank=0, world_size=1, seed=0)
    for step in range(steps):
        loss, _ = objective.loss("generator", next(batches), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 10.0)
        optimizer.step()
    return objective, generator.eval()


def sample_from_noise(objective, generator, prompts: list[str], guidance_scale: float, steps: int = 20):
    """Latents ``[B, 3, 16, 8, 8]``: the multi-step Stage-1 sampler (Euler, CFG against "") through the KV cache."""
    scheduler = objective.scheduler
    pipe = StreamingPipeline(generator, objective.networks.frozen["text_encoder"], None, scheduler,
                             StepSchedule(scheduler.inference_timesteps(steps).tolist(), rule="euler"),
                             latent_shape=(16, 8, 8), negative_prompt="", guidance_scale=guidance_scale,
                             default_num_frames=3)
    with torch.no_grad():
        return pipe.generate(prompts, seed=123, output_type="latent").latents


def motion_direction(latents: torch.Tensor) -> torch.Tensor:
    """Index into DIRECTIONS of each video's motion ``[B]``: the move of the latent energy centroid from the first to
    the last frame (the background encodes to 0, so the energy is the object's)."""
    energy = latents.float().pow(2).sum(2)                                           # [B, F, h, w]
    h, w = energy.shape[-2:]
    total = energy.sum((2, 3)).clamp_min(1e-12)
    cy = (energy * torch.arange(h, dtype=torch.float32).view(h, 1)).sum((2, 3)) / total
    cx = (energy * torch.arange(w, dtype=torch.float32).view(1, w)).sum((2, 3)) / total
    move = torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], -1)          # (dx, dy), y grows downwards
    return (move @ torch.tensor([S.DIRECTIONS[d] for d in DIRECTIONS], dtype=torch.float32).T).argmax(-1)


def object_colour(latents: torch.Tensor) -> torch.Tensor:
    """Index into CAPTION_COLORS of each video's object ``[B]``: the energy-weighted mean latent channel vector against
    LinearToyVAE's image of each colour (cosine)."""
    vae = LinearToyVAE()
    rgb = torch.tensor([S.COLORS[c] for c in CAPTION_COLORS], dtype=torch.float32) / 127.5 - 1
    images = (rgb - vae.background.flatten()) @ vae.lift.T                             # [colours, 16]
    energy = latents.float().pow(2).sum(2, keepdim=True)
    mean = (latents.float() * energy).sum((1, 3, 4)) / energy.sum((1, 3, 4)).clamp_min(1e-12)   # [B, 16]
    return F.cosine_similarity(mean[:, None], images[None], dim=-1).argmax(-1)


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p), exactly."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(hits, n + 1))


def caption_prompts(n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``n`` prompts cycling through every (colour, direction) pair, and their colour and direction indices."""
    colours = torch.arange(n) % len(CAPTION_COLORS)
    directions = (torch.arange(n) // len(CAPTION_COLORS)) % len(DIRECTIONS)
    prompts = [S.format_caption({"color": CAPTION_COLORS[c], "shape": "circle", "direction": DIRECTIONS[d],
                                 "speed": "fast"}) for c, d in zip(colours.tolist(), directions.tolist())]
    return prompts, colours, directions


def test_caption_words_reach_the_generator(caption_world):
    """Captions that differ in one word must reach the DiT as different contexts. The ``world`` fixture's 41-piece
    character-level tokenizer spends 19-27 tokens on a caption and TINY_DIT keeps text_len = 16, so there every
    caption was cut before its direction word (this is why the direction was never learned there); the one-piece-per-
    word tokenizer of ``caption_world`` spends 7."""
    captions = [S.format_caption({"color": "red", "shape": "circle", "direction": d, "speed": "fast"})
                for d in DIRECTIONS]
    objective, _ = build(caption_world, data_path=str(caption_world / "train"))
    context = objective.encode_prompts(captions)
    assert all(not torch.equal(context[0], context[i]) for i in range(1, len(captions)))


def test_samples_follow_the_caption(caption_world, one_thread):
    """300 teacher-forcing steps with caption dropout 0.2, then 64 samples from noise with CFG 4 against "": the
    object takes the captioned colour far more often than chance (1/4). The captioned *direction* is reported in the
    message but not asserted (see the module docstring: not learned reliably in a CI-sized run)."""
    objective, generator = train_with_caption_dropout(caption_world, steps=300)
    prompts, colours, directions = caption_prompts(64)
    latents = sample_from_noise(objective, generator, prompts, guidance_scale=4.0)
    colour_hits = int((object_colour(latents) == colours).sum())
    direction_hits = int((motion_direction(latents) == directions).sum())
    p = binomial_tail(colour_hits, len(prompts), 0.25)
    assert p < 0.01, (f"captioned colour in {colour_hits}/{len(prompts)} samples (chance 1/4, binomial p={p:.2g}); "
                      f"direction {direction_hits}/{len(prompts)}")


def test_teacher_forcing_from_the_toy_base_learns_the_captioned_direction(repo_root, tmp_path):
    """Stage 1 as the recipe runs it, through ``train.py`` and ``inference.py`` with configs/toy: teacher forcing,
    chunk-wise, starting from a bidirectional base that knows the toy world (the shipped toy base stands in for
    Wan2.1, as the real Stage 1 starts from Wan), 30 steps of batch 8 on 64 clips encoded by the toy VAE, then 16
    videos (8 prompts of prompts/toy.txt x 2, 50 steps, CFG 3) scored by the toy detector.

    Measured on 2 CPU cores (AMD EPYC, 2026-12-07, the 2600-step base): the captioned direction in 14 of 16 videos
    after 30 steps (13 after 25, 14 after 40); the same 16 videos from the base weights used causally without the
    training (inference.py with the config and no checkpoint): 7 of 16. With 3 videos a prompt the 40-step model
    scored 24 of 24 (2026-12-06 and -07) against 10 of 24 untrained. Chance is 1/4; the bar, binomial p < 1e-3, means
    >= 11 of 16, between the untrained and the trained model. Fewer sampling steps would be cheaper but tell the two
    apart less well: with ``sample_steps`` 16 or 25 the untrained weights reach 10 and 11 of 16. The caption_world
    runs above learn the colour but not the direction from scratch in a CI budget; from a base that has the motion,
    teacher forcing learns to produce it block by block."""
    import json
    import os
    import subprocess
    import sys

    base = repo_root / "assets" / "toy" / "Toy-T2V"
    train, _ = S.make_split(64, 1, 0)
    encode_videos_to_lmdb(train, WanVAE.from_pretrained(base / "vae"), tmp_path / "lmdb", batch_size=16)
    env = dict(os.environ, WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    config = "configs/toy/ar_diffusion_tf_chunkwise.yaml"
    run = subprocess.run([sys.executable, "train.py", "--config_path", config, "--logdir", str(tmp_path / "log"),
                          "--no_visualize",  # the checkpoint's two sample videos: 15 s that nothing here reads
                          "--override", f"data_path={tmp_path / 'lmdb'}", "max_steps=30", "log_iters=30",
                          "batch_size=8"],   # as measured (the config's batch is sized for a GPU)
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = tmp_path / "log" / "checkpoint_model_000030" / "model.pt"
    out = tmp_path / "videos"
    run = subprocess.run([sys.executable, "inference.py", "--config_path", config, "--checkpoint_path", str(checkpoint),
                          "--data_path", "prompts/toy.txt", "--output_folder", str(out), "--num_samples", "2"],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "toy.eval_videos", "--video_folder", str(out), "--data_path",
                          "prompts/toy.txt", "--num_samples", "2", "--out", str(tmp_path / "eval.json"), "--quiet",
                          "--num_real", "8"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    videos = json.loads((tmp_path / "eval.json").read_text())["videos"]
    hits = sum(int(v["direction"]) for v in videos)
    p = binomial_tail(hits, len(videos), 0.25)
    assert len(videos) == 16 and p < 1e-3, (f"captioned direction in {hits}/{len(videos)} videos (chance 1/4, "
                                            f"binomial p={p:.2g})")


# ------------------------------------------------------------------------------------------------ encode_videos

@pytest.fixture(scope="module")
def tiny_vae(world):
    return WanVAE.from_pretrained(world / "wan" / "tiny" / "vae")  # the folder's own config.json is the DiT's


def test_encode_videos_to_lmdb_rows(world, tiny_vae, tmp_path):
    clips = S.make_dataset(2, seed=5, **PIXELS)
    clips.append(S.make_dataset(1, seed=6, num_frames=20, height=48, width=80)[0])  # cropped and cut to 64x64x17
    rows = encode_videos_to_lmdb(clips, tiny_vae, tmp_path / "lmdb", height=64, width=64, num_frames=17,
                                 batch_size=2)
    assert rows == 3
    ds = LatentLMDBDataset(tmp_path / "lmdb")
    assert ds.reader.shape("latents") == (3, 1, *LATENT)
    assert [ds[i]["prompts"] for i in range(3)] == [caption for caption, _ in clips]
    pixels = torch.from_numpy(clips[0][1]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        direct = tiny_vae.encode(pixels)[0]
    # stored as float16: relative error <= 2^-11 of each value, plus fp16's absolute floor
    torch.testing.assert_close(ds[0]["clean_latent"], direct, rtol=1e-3, atol=1e-4)


def test_encode_videos_cli(world, tmp_path, caplog):
    folder = tmp_path / "videos"
    folder.mkdir()
    clips = S.make_dataset(2, seed=9, **PIXELS)
    for i, (caption, frames) in enumerate(clips):
        write_mp4(folder / f"clip_{i}.mp4", frames, fps=16)
        (folder / f"clip_{i}.txt").write_text(caption + "\n")
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "broken.txt").write_text("a red circle moving up quickly")
    (folder / "uncaptioned.mp4").write_bytes(b"")
    out = tmp_path / "lmdb"
    rc = main(["--input_dir", str(folder), "--lmdb_path", str(out), "--wan_models_dir", str(world / "wan"),
               "--model_name", "tiny", "--height", "64", "--width", "64", "--num_frames", "17", "--fps", "16",
               "--device", "cpu", "--no_progress"])
    assert rc == 0
    assert "broken.mp4" in caplog.text and "uncaptioned.mp4" in caplog.text
    ds = LatentLMDBDataset(out)
    assert len(ds) == 2 and [ds[i]["prompts"] for i in range(2)] == [c for c, _ in clips]
    assert ds[0]["clean_latent"].shape == LATENT
    assert main(["--input_dir", str(tmp_path / "missing"), "--lmdb_path", str(tmp_path / "x")]) == 2


def test_read_ahead_keeps_order_and_skips_broken_files(tmp_path):
    """--num_workers decodes in threads; the clips must come out in file order, broken ones as None, equal to the
    serial read."""
    from app.encode_videos import read_all

    pairs = []
    for i, (caption, frames) in enumerate(S.make_dataset(5, seed=4, **PIXELS)):
        write_mp4(tmp_path / f"c{i}.mp4", frames, fps=16)
        pairs.append((tmp_path / f"c{i}.mp4", caption))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    pairs.insert(2, (tmp_path / "bad.mp4", "a red circle moving up quickly"))
    serial = list(read_all(pairs, 17, 16, num_workers=0))
    threaded = list(read_all(pairs, 17, 16, num_workers=2))
    assert [x is None for x in threaded] == [False, False, True, False, False, False]
    for a, b in zip(serial, threaded):
        assert (a is None and b is None) or (a[0] == b[0] and np.array_equal(a[1], b[1]))
    assert [x[0] for x in threaded if x] == [c for _, c in pairs if c and _.name != "bad.mp4"]


def test_caption_layouts(tmp_path):
    (tmp_path / "b.mp4").write_bytes(b"")
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_text("  a red\n circle ")
    assert list_captioned_videos(tmp_path) == [(tmp_path / "a.mp4", "a red circle")]   # b.mp4: no caption
    (tmp_path / "captions.txt").write_text("b.mp4\tthe b clip\na.mp4\tthe a clip\n")
    assert list_captioned_videos(tmp_path) == [(tmp_path / "b.mp4", "the b clip"), (tmp_path / "a.mp4", "the a clip")]
    (tmp_path / "captions.jsonl").write_text('{"video": "a.mp4", "caption": "json a"}\n')
    with pytest.raises(DataError, match="both captions.jsonl and captions.txt"):
        list_captioned_videos(tmp_path)
    (tmp_path / "captions.txt").unlink()
    assert list_captioned_videos(tmp_path) == [(tmp_path / "a.mp4", "json a")]


def test_encode_videos_help_explains_every_flag():
    actions = [a for a in build_parser()._actions if a.dest != "help"]
    assert len(actions) >= 10 and all(a.help for a in actions), [a.dest for a in actions if not a.help]
