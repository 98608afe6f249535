"""Long and endless videos through the streaming API and inference.py on tiny Wan folders (CPU): Rolling Forcing
streams, endless streams at constant memory, the published Rolling Forcing command, a CLI video past 1,024 latent
frames written whole."""

import itertools

import pytest
import torch

import inference
from model.loader import read_state_dict, save_release_checkpoint
from pipeline.streaming import StreamingPipeline
from tests.conftest import write_tiny_stream_config
from toy.folders import write_tiny_wan_folder
from utils.config import load_config
from utils.video import read_mp4

PROMPT = "a red circle moving left slowly"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def yaml(tmp_path_factory):
    return write_tiny_stream_config(tmp_path_factory.mktemp("wan_models"))


@pytest.fixture(scope="module")
def rolling(yaml):
    """Chunk-wise 4-step Rolling Forcing: windows of 12 frames, each call attending to 15 (3 of them sink)."""
    cfg = load_config(str(yaml), ["rolling_forcing=true", "model_kwargs.local_attn_size=15"])
    return StreamingPipeline.from_config(cfg, device="cpu")


@pytest.fixture(scope="module")
def plain(yaml):
    return StreamingPipeline.from_config(load_config(str(yaml)), device="cpu")


def test_rolling_stream_hands_out_each_block_once_in_order(rolling):
    assert rolling.window(None) == (18, 3)
    chunks = list(rolling.open(PROMPT, num_latent_frames=18, seed=2))
    assert [(c.block_index, c.start_frame, c.latents.shape[1]) for c in chunks] == \
        [(0, 0, 1), (0, 1, 2)] + [(b, 3 * b, 3) for b in range(1, 6)]
    video = rolling.generate(PROMPT, num_latent_frames=18, seed=2, output_type="pt")
    frames, latents = video.frames, video.latents
    assert torch.equal(latents, torch.cat([c.latents for c in chunks], 1)) and frames.shape[1] == 1 + 4 * 17


def test_rolling_prompt_switch_changes_only_later_blocks(rolling):
    base = list(rolling.open(PROMPT, num_latent_frames=18, seed=5, decode=False))
    stream = rolling.open(PROMPT, num_latent_frames=18, seed=5, decode=False)
    first = [next(stream), next(stream)]
    stream.switch_prompt("a yellow square moving down quickly")
    rest = list(stream)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(first, base))
    assert rest[0].switched and not any(c.switched for c in rest[1:])
    assert not torch.allclose(rest[0].latents, base[2].latents)


@pytest.mark.parametrize("which", ["plain", "rolling"])
def test_endless_stream_runs_at_constant_memory(which, request):
    """40 blocks of an endless stream (no frame count): the cache never grows and the stream keeps only the latents
    its cache holds; a prompt switch with re-encoding re-fills the cache from them."""
    pipe = request.getfixturevalue(which)
    stream = pipe.open(PROMPT, seed=1, decode=False, endless=True)
    sizes, held = [], []
    for i, chunk in enumerate(itertools.islice(stream, 40)):
        sizes.append(stream.cache.nbytes)
        held.append(sum(x.shape[1] for _, x in stream.held))
        if i == 20:
            stream.switch_prompt("a blue square moving up quickly", recache=True)
    assert chunk.start_frame == 117 and len(set(sizes)) == 1
    assert max(held) <= stream.cache.capacity + pipe.generator.num_frame_per_block
    stream.close()
    assert stream.cache.k.numel() == 0 and stream.held == []


def test_published_rolling_forcing_command(tmp_path, repo_root):
    """The published command with the shipped config and flags, on a tiny folder and an EMA checkpoint (the released
    chunkwise/longvideo.pt is used with --use_ema)."""
    write_tiny_wan_folder(tmp_path / "Tiny")
    sd = read_state_dict(str(tmp_path / "Tiny"))
    save_release_checkpoint(str(tmp_path / "longvideo.pt"), sd, {k: v + 0.01 for k, v in sd.items()})
    (tmp_path / "demos.txt").write_text(PROMPT + "\n")
    out = tmp_path / "videos"
    code = inference.main([
        "--config_path", str(repo_root / "configs" / "rolling_forcing_dmd.yaml"),
        "--checkpoint_path", str(tmp_path / "longvideo.pt"), "--data_path", str(tmp_path / "demos.txt"),
        "--num_output_frames", "30", "--use_ema", "--output_folder", str(out), "--device", "cpu",
        "--override", f"wan_models_dir={tmp_path}", "generator_name=Tiny", "text_encoder_name=Tiny",
        "image_or_video_shape=[1,21,16,2,2]"])
    assert code == 0
    assert read_mp4(out / f"{PROMPT}.mp4").shape == (1 + 4 * 29, 16, 16, 3)


def test_cli_video_past_1024_latent_frames_is_written_whole(tmp_path):
    """1,032 latent frames (4,125 pixel frames) of one token each, chunk-wise 2-step: every position is re-based
    inside the RoPE table and the mp4 holds the whole video."""
    write_tiny_wan_folder(tmp_path / "Tiny")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"trainer: score_distillation\nwan_models_dir: {tmp_path}\ngenerator_name: Tiny\n"
                      "text_encoder_name: Tiny\nnum_frame_per_block: 3\nimage_or_video_shape: [1, 6, 16, 2, 2]\n"
                      "denoising_step_list: [1000, 500]\nwarp_denoising_step: true\n")
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    code = inference.main(["--config_path", str(config), "--data_path", str(tmp_path / "prompts.txt"),
                           "--output_folder", str(tmp_path / "out"), "--num_output_frames", "1032",
                           "--device", "cpu", "--save_latents"])
    assert code == 0
    assert read_mp4(tmp_path / "out" / f"{PROMPT}.mp4").shape == (1 + 4 * 1031, 16, 16, 3)
    latents = torch.load(tmp_path / "out" / f"{PROMPT}.latents.pt", weights_only=True)
    assert latents.shape == (1, 1032, 16, 2, 2) and torch.isfinite(latents).all()
