"""The streaming API on a tiny Wan folder: streamed == one-shot, long video with fixed memory, I2V, prompt switch."""

import pytest
import torch

from pipeline.streaming import StreamingPipeline
from tests.conftest import write_tiny_stream_config
from utils.config import load_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_models")
    yaml = write_tiny_stream_config(root)
    return load_config(str(yaml))


@pytest.fixture(scope="module")
def pipe(cfg):
    return StreamingPipeline.from_config(cfg, device="cpu")


def test_stream_yields_blocks_and_equals_one_shot_decode(pipe):
    stream = pipe.open("a red circle moving left slowly", num_latent_frames=6, seed=3)
    chunks = [next(stream)]
    assert stream.decoder.num_latent_frames == 1  # the first frame left before the rest of its block was decoded
    chunks += list(stream)
    # blocks of 3 latent frames; the first block leaves as its first frame, then the other two
    assert [(c.block_index, c.start_frame, c.latents.shape[1]) for c in chunks] == [(0, 0, 1), (0, 1, 2), (1, 3, 3)]
    assert [c.frames.shape for c in chunks] == [(1, 1, 3, 32, 48), (1, 8, 3, 32, 48), (1, 12, 3, 32, 48)]
    latents = torch.cat([c.latents for c in chunks], 1)
    one_shot = pipe.vae.decode(latents)
    streamed = torch.cat([c.frames for c in chunks], 1)
    assert (streamed - one_shot).abs().max() < 1e-5
    again = pipe.generate("a red circle moving left slowly", num_latent_frames=6, seed=3, output_type="pt")
    assert torch.equal(again.latents, latents) and torch.equal(again.frames, streamed)  # same seed, same video


def test_uint8_stream_hands_out_the_writers_bytes(pipe):
    """``open(uint8=True)``: the same video, frames as uint8 [B, T, H, W, 3] on the host with exactly the values the
    mp4 writer makes of the float frames (utils.video.to_uint8_frames)."""
    from utils.video import to_uint8_frames

    floats = list(pipe.open("a red circle moving left slowly", num_latent_frames=6, seed=3))
    uint8 = list(pipe.open("a red circle moving left slowly", num_latent_frames=6, seed=3, uint8=True))
    for f, u in zip(floats, uint8, strict=True):
        assert u.frames.dtype == torch.uint8 and u.frames.device.type == "cpu"
        assert u.frames.shape == (1, f.frames.shape[1], 32, 48, 3)
        assert (u.frames[0].numpy() == to_uint8_frames(f.frames[0], (-1, 1), "TCHW")).all()


def test_long_video_uses_a_fixed_window(pipe):
    stream = pipe.open("a blue square moving up quickly", num_latent_frames=15, seed=0, decode=False)
    cache = stream.cache
    assert cache.capacity == 6 and cache.sink == 3  # window = training length, one block of sink frames
    size = cache.k.nbytes
    chunks = list(stream)
    assert len(chunks) == 5 and size == cache.k.nbytes or cache.k.numel() == 0


def test_i2v_keeps_the_given_first_frame(pipe):
    image_latent = torch.randn(1, 3, 16, 4, 6)
    out = pipe.generate("a green triangle moving right slowly", num_latent_frames=3, seed=1,
                        initial_latent=image_latent, output_type="pt")
    frames, latents = out.frames, out.latents
    assert torch.equal(latents[:, :3], image_latent) and latents.shape[1] == 6
    assert frames.shape[1] == 1 + 4 * 5


def test_prompt_switch_changes_only_later_blocks(pipe):
    base = list(pipe.open("a red circle moving left slowly", num_latent_frames=6, seed=5, decode=False))
    stream = pipe.open("a red circle moving left slowly", num_latent_frames=6, seed=5, decode=False)
    first = next(stream)
    stream.switch_prompt("a yellow square moving down quickly")
    second = next(stream)
    assert torch.equal(first.latents, base[0].latents)
    assert second.switched and not torch.allclose(second.latents, base[1].latents)


def test_config_attention_backend_is_applied(cfg):
    from model import attention
    from pipeline.components import build_generator
    from utils.errors import ConfigError

    try:
        build_generator(_with(cfg, "sdpa"))
        assert attention.get_backend() == "sdpa"
        if attention._load_flash() is None:  # the CPU machines: no flash-attn package
            with pytest.raises(ConfigError, match="attention_backend: .*no flash-attn package is installed"):
                build_generator(_with(cfg, "flash_attn"))
    finally:
        attention.set_backend("auto")


def _with(cfg, backend):
    import dataclasses

    return dataclasses.replace(cfg, attention_backend=backend)


@pytest.mark.parametrize("solver, steps", [("unipc", None), ("unipc", 12), ("euler", 7)])
def test_many_step_models_sample_with_the_configured_solver(cfg, solver, steps):
    """No step list (a Stage-1 model): ``sample_steps`` (default 50, as published) steps of ``sample_solver`` -- by
    default Wan's UniPC on the published grid -- with classifier-free guidance; the stream still equals its one-shot
    run."""
    import dataclasses

    from model.unipc import unipc_grid

    stage1 = dataclasses.replace(cfg, denoising_step_list=None, sample_solver=solver,
                                 **({} if steps is None else {"sample_steps": steps}))
    pipe = StreamingPipeline.from_config(stage1, device="cpu", decode=False)
    assert pipe.schedule.rule == solver and pipe.guidance_scale == stage1.guidance_scale
    assert len(pipe.schedule.timesteps) == (steps or 50)
    if solver == "unipc":
        assert pipe.schedule.timesteps == unipc_grid(steps or 50, stage1.timestep_shift)[0]
    chunks = list(pipe.open("a red circle", num_latent_frames=6, seed=1, decode=False))
    assert [c.latents.shape[1] for c in chunks] == [3, 3] and torch.isfinite(chunks[-1].latents).all()
    latents = pipe.generate("a red circle", num_latent_frames=6, seed=1, output_type="latent").latents
    assert torch.equal(torch.cat([c.latents for c in chunks], 1), latents)


def test_default_config_samples_many_step_models_with_unipc():
    from utils.config import Config
    from utils.errors import ConfigError

    assert Config(trainer="diffusion").sample_solver == "unipc"
    with pytest.raises(ConfigError, match="sample_steps must be >= 1, got 0"):
        Config(trainer="diffusion", sample_steps=0)


# ---------------------------------------------------------------------------------------------------------------------
# the diffusers-shaped surface: video-frame counts, generator=, output types, from_pretrained


def test_num_frames_counts_video_frames(pipe):
    """num_frames = 4k + 1 video frames of the whole video (diffusers' unit): 21 frames = 6 latent frames here."""
    by_video = pipe.generate("a red circle moving left slowly", num_frames=21, seed=3, output_type="pt")
    by_latent = pipe.generate("a red circle moving left slowly", num_latent_frames=6, seed=3, output_type="pt")
    assert by_video.frames.shape[1] == 21 and by_video.latents.shape[1] == 6
    assert torch.equal(by_video.frames, by_latent.frames)
    assert pipe.num_latent_frames(num_frames=21, prefix=3) == 3   # with a prefix: still the whole video


@pytest.mark.parametrize("frames, nearest", [(20, "9 or 21"), (33 - 4, "21 or 33"), (13, "9 or 21"), (0, "9")])
def test_other_video_lengths_name_the_nearest_valid_ones(pipe, frames, nearest):
    # chunk-wise (3 latent frames a block): 3, 6, 9 latent frames -> 9, 21, 33 video frames
    with pytest.raises(ValueError, match=f"num_frames={frames} is not a video length.*nearest: {nearest} "):
        pipe.open("a red circle", num_frames=frames)
    with pytest.raises(ValueError, match="not both"):
        pipe.open("a red circle", num_frames=21, num_latent_frames=6)


def test_generator_seeds_the_video_with_its_next_draw(pipe):
    def run(generator):
        return pipe.generate("a red circle", num_frames=9, generator=generator, output_type="latent").latents

    g = torch.Generator().manual_seed(7)
    first, second = run(g), run(g)                    # the generator moved on: a different video
    assert torch.equal(first, run(torch.Generator().manual_seed(7))) and not torch.equal(first, second)
    seed = int(torch.randint(2**63 - 1, (1,), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(first, pipe.generate("a red circle", num_frames=9, seed=seed, output_type="latent").latents)


def test_output_types(pipe):
    import numpy as np
    from PIL import Image

    from utils.video import to_uint8_frames

    kwargs = dict(prompt="a red circle", num_frames=9, seed=2)
    pt = pipe.generate(**kwargs, output_type="pt")
    arrays = pipe.generate(**kwargs)                  # default "np": uint8 [B, T, H, W, 3]
    assert isinstance(arrays.frames, np.ndarray) and arrays.frames.dtype == np.uint8
    assert (arrays.frames[0] == to_uint8_frames(pt.frames[0], (-1, 1), "TCHW")).all()
    pil = pipe.generate(**kwargs, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 9 and isinstance(pil[0][0], Image.Image) and pil[0][0].size == (48, 32)
    assert (np.asarray(pil[0][4]) == arrays.frames[0, 4]).all()
    latent = pipe.generate(**kwargs, output_type="latent")
    assert latent.frames is None and torch.equal(latent.latents, pt.latents)
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe.generate(**kwargs, output_type="mp4")


@pytest.mark.parametrize("name, config, ema", [
    ("zhuhz22/Causal-Forcing/chunkwise/causal_forcing.pt", "causal_forcing_dmd_chunkwise", False),
    ("zhuhz22/Causal-Forcing/framewise/causal_forcing.pt", "causal_forcing_dmd_framewise", True),
    ("zhuhz22/Causal-Forcing/causal-forcing++/framewise-1step.pt", "causal_forcing_dmd_framewise_1step", True),
    ("zhuhz22/Causal-Forcing/chunkwise/causal_ode.pt", "causal_ode_chunkwise", False),
    ("zhuhz22/Causal-Forcing/chunkwise/longvideo.pt", "rolling_forcing_dmd", True),   # Rolling Forcing, as trained
])
def test_from_pretrained_runs_a_released_file_with_its_shipped_config(monkeypatch, name, config, ema):
    seen = {}
    monkeypatch.setattr(StreamingPipeline, "from_config", classmethod(
        lambda cls, cfg, checkpoint, use_ema, **kw: seen.update(cfg=cfg, checkpoint=checkpoint, ema=use_ema, kw=kw)))
    StreamingPipeline.from_pretrained(name, device="cpu")
    assert (seen["cfg"].config_name, seen["checkpoint"], seen["ema"], seen["kw"]) == (config, name, ema,
                                                                                       {"device": "cpu"})


def test_every_released_file_has_a_shipped_config():
    from model.weights import RELEASED_CHECKPOINTS
    from pipeline.api import RELEASED_CONFIGS
    from utils.paths import CONFIGS_DIR

    assert sorted(RELEASED_CONFIGS) == sorted(RELEASED_CHECKPOINTS)
    assert all((CONFIGS_DIR / f"{config}.yaml").is_file() for config, _ in RELEASED_CONFIGS.values())


def test_from_pretrained_takes_a_shipped_config_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # found from any working directory
    pipe = StreamingPipeline.from_pretrained("toy/causal_forcing_dmd_framewise", device="cpu", decode=False)
    assert pipe.generator.num_frame_per_block == 1 and pipe.fps == 8
    pipe = StreamingPipeline.from_pretrained("configs/toy/causal_forcing_dmd_chunkwise.yaml", device="cpu",
                                             decode=False, overrides=["negative_prompt=x"])
    assert pipe.generator.num_frame_per_block == 3 and pipe.negative_prompt == "x"


def test_readme_python_example_saves_an_mp4(repo_root, tmp_path, monkeypatch):
    """README's "From Python" example, run as written (the shipped toy model, CPU)."""
    from utils.video import read_mp4

    readme = (repo_root / "README.md").read_text()
    code = next(block for block in readme.split("```python")[1:] if "from_pretrained" in block).split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1 and read_mp4(videos[0]).shape == (33, 64, 64, 3)
