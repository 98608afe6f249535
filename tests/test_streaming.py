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
    stream = pipe.open("a red circle moving left slowly", num_frames=6, seed=3)
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
    frames, lat2 = pipe.generate("a red circle moving left slowly", num_frames=6, seed=3)
    assert torch.equal(lat2, latents)  # same seed, same video


def test_uint8_stream_hands_out_the_writers_bytes(pipe):
    """``open(uint8=True)``: the same video, frames as uint8 [B, T, H, W, 3] on the host with exactly the values the
    mp4 writer makes of the float frames (utils.video.to_uint8_frames)."""
    from utils.video import to_uint8_frames

    floats = list(pipe.open("a red circle moving left slowly", num_frames=6, seed=3))
    uint8 = list(pipe.open("a red circle moving left slowly", num_frames=6, seed=3, uint8=True))
    for f, u in zip(floats, uint8, strict=True):
        assert u.frames.dtype == torch.uint8 and u.frames.device.type == "cpu"
        assert u.frames.shape == (1, f.frames.shape[1], 32, 48, 3)
        assert (u.frames[0].numpy() == to_uint8_frames(f.frames[0], (-1, 1), "TCHW")).all()


def test_long_video_uses_a_fixed_window(pipe):
    stream = pipe.open("a blue square moving up quickly", num_frames=15, seed=0, decode=False)
    cache = stream.cache
    assert cache.capacity == 6 and cache.sink == 3  # window = training length, one block of sink frames
    size = cache.k.nbytes
    chunks = list(stream)
    assert len(chunks) == 5 and size == cache.k.nbytes or cache.k.numel() == 0


def test_i2v_keeps_the_given_first_frame(pipe):
    image_latent = torch.randn(1, 3, 16, 4, 6)
    frames, latents = pipe.generate("a green triangle moving right slowly", num_frames=3, seed=1,
                                    initial_latent=image_latent)
    assert torch.equal(latents[:, :3], image_latent) and latents.shape[1] == 6
    assert frames.shape[1] == 1 + 4 * 5


def test_prompt_switch_changes_only_later_blocks(pipe):
    base = list(pipe.open("a red circle moving left slowly", num_frames=6, seed=5, decode=False))
    stream = pipe.open("a red circle moving left slowly", num_frames=6, seed=5, decode=False)
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


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_many_step_models_sample_with_the_configured_solver(cfg, solver):
    """No step list (a Stage-1 model): 50 steps of ``sample_solver`` -- by default Wan's UniPC on the published
    grid -- with classifier-free guidance; the stream still equals its one-shot run."""
    import dataclasses

    from model.unipc import unipc_grid

    stage1 = dataclasses.replace(cfg, denoising_step_list=None, sample_solver=solver)
    pipe = StreamingPipeline.from_config(stage1, device="cpu", decode=False)
    assert pipe.schedule.rule == solver and pipe.guidance_scale == stage1.guidance_scale
    assert len(pipe.schedule.timesteps) == 50
    if solver == "unipc":
        assert pipe.schedule.timesteps == unipc_grid(50, stage1.timestep_shift)[0]
    chunks = list(pipe.open("a red circle", num_frames=6, seed=1, decode=False))
    assert [c.latents.shape[1] for c in chunks] == [3, 3] and torch.isfinite(chunks[-1].latents).all()
    _, latents = pipe.generate("a red circle", num_frames=6, seed=1, decode=False)
    assert torch.equal(torch.cat([c.latents for c in chunks], 1), latents)


def test_default_config_samples_many_step_models_with_unipc():
    from utils.config import Config

    assert Config(trainer="diffusion").sample_solver == "unipc"
