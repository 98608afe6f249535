"""inference.py end to end on a tiny Wan folder (CPU): files, frame counts, seeds, EMA, distributed shares, errors."""

import os

import pytest
import torch

import inference
from model.loader import read_state_dict, save_release_checkpoint
from tests.conftest import fill_disk
from toy.folders import write_tiny_wan_folder
from utils.video import read_mp4

YAML = """
trainer: score_distillation
wan_models_dir: {root}
generator_name: Tiny
text_encoder_name: Tiny
num_frame_per_block: {n}
image_or_video_shape: [1, 6, 16, 4, 6]
num_training_frames: 6
height: 32
width: 48
denoising_step_list: [1000, 500]
warp_denoising_step: true
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_models")
    write_tiny_wan_folder(root / "Tiny")
    for n in (1, 3):
        (root / f"cfg{n}.yaml").write_text(YAML.format(root=root, n=n))
    sd = read_state_dict(str(root / "Tiny"))
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in sd.items()}
    save_release_checkpoint(str(root / "ckpt.pt"), sd, ema)
    (root / "prompts.txt").write_text("a red circle moving left slowly\na/b \"quoted\" prompt ✨\n")
    return root


def run(world, tmp_path, *extra, n=3, data="prompts.txt"):
    out = tmp_path / "out"
    argv = ["--config_path", str(world / f"cfg{n}.yaml"), "--data_path", str(world / data),
            "--output_folder", str(out), "--device", "cpu", *extra]
    return inference.main(argv), out


@pytest.mark.parametrize("n", [1, 3])
def test_writes_videos_with_expected_frames(world, tmp_path, n):
    code, out = run(world, tmp_path, "--checkpoint_path", str(world / "ckpt.pt"), "--save_latents", n=n)
    assert code == 0
    files = sorted(f for f in os.listdir(out) if f.endswith(".mp4"))
    assert files == sorted(["a red circle moving left slowly.mp4", "a_b _quoted_ prompt ✨.mp4"])
    video = read_mp4(out / files[0])
    assert video.shape == (1 + 4 * 5, 32, 48, 3)


def test_seed_reproduces_and_ema_differs(world, tmp_path):
    def latents(tag, *extra):
        code, out = run(world, tmp_path / tag, "--checkpoint_path", str(world / "ckpt.pt"), "--save_latents", *extra)
        assert code == 0
        return torch.load(out / "a red circle moving left slowly.latents.pt", weights_only=True)
    a, b = latents("a", "--seed", "7"), latents("b", "--seed", "7")
    assert torch.equal(a, b)
    assert not torch.equal(a, latents("c", "--seed", "8"))
    assert not torch.equal(a, latents("d", "--seed", "7", "--use_ema"))


def test_temporaries_a_killed_run_left_are_removed(world, tmp_path):
    """Temporaries of this run's videos (and those of earlier versions' writers) are deleted; one of another name,
    which another rank may be writing right now, is left alone."""
    out = tmp_path / "out"
    out.mkdir()
    stem = "a red circle moving left slowly"
    stale = [f".tmp-0123abcd-{stem}.mp4", f".tmp-0123abcd-{stem}.latents.pt",         # this writer's
             ".tmp_0123456789abcdef0123456789abcdef.mp4", f".{stem}.latents.pt.tmp"]  # earlier writers'
    foreign = ".tmp-89abcdef-a prompt of another rank.mp4"
    for name in (*stale, foreign):
        (out / name).write_bytes(b"partial")
    code, _ = run(world, tmp_path, "--save_latents")
    assert code == 0 and not any((out / name).exists() for name in stale) and (out / foreign).exists()


def test_existing_outputs_are_skipped_unless_overwrite(world, tmp_path):
    run(world, tmp_path)
    path = tmp_path / "out" / "a red circle moving left slowly.mp4"
    mtime = path.stat().st_mtime_ns
    run(world, tmp_path)
    assert path.stat().st_mtime_ns == mtime
    run(world, tmp_path, "--overwrite")
    assert path.stat().st_mtime_ns != mtime


def test_ranks_share_prompts_exactly_once(world, tmp_path, monkeypatch):
    (world / "many.txt").write_text("\n".join(f"prompt number {i}" for i in range(5)))
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        run(world, tmp_path, data="many.txt")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"prompt number {i}.mp4" for i in range(5))


@pytest.mark.parametrize("setup,extra,message", [
    (None, ["--data_path", "/nonexistent/prompts.txt"], "prompt file not found"),
    ("empty", [], "empty"),
    (None, ["--checkpoint_path", "checkpoints/chunkwise/causal_forcing.pt"], "hf download zhuhz22/Causal-Forcing"),
    (None, ["--num_output_frames", "5"], "num_frame_per_block"),
    ("badckpt", [], "unexpected"),
    (None, ["--preview_decoder", "/nonexistent/taew2_1.pth"], "preview decoder not found"),
])
def test_bad_inputs_give_one_line_errors(world, tmp_path, capsys, setup, extra, message):
    args = list(extra)
    if setup == "empty":
        (tmp_path / "empty.txt").write_text("\n \n")
        args += ["--data_path", str(tmp_path / "empty.txt")]
    if setup == "badckpt":
        sd = read_state_dict(str(world / "Tiny"))
        sd["blocks.0.extra.weight"] = torch.zeros(1)
        torch.save({"generator": sd}, tmp_path / "bad.pt")
        args += ["--checkpoint_path", str(tmp_path / "bad.pt")]
    code, _ = run(world, tmp_path, *args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: ") and message in err, err


def test_full_disk_is_an_error_and_a_rerun_writes_the_video(world, tiny_disk, capsys):
    """A disk that fills while a video is written: exit 2 with one line, no mp4 under its final name (so a rerun does
    not skip it), no temporary file; once there is room, the rerun writes it."""
    filler = fill_disk(tiny_disk, leave=4096)
    argv = ["--config_path", str(world / "cfg3.yaml"), "--data_path", str(world / "prompts.txt"),
            "--output_folder", str(tiny_disk), "--device", "cpu"]
    assert inference.main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]        # the lines before are progress bars
    assert "Traceback" not in err and last.startswith("error: ") and "nothing was saved" in last, err
    assert sorted(os.listdir(tiny_disk)) == ["filler"]
    filler.unlink()
    assert inference.main(argv) == 0
    assert sorted(f for f in os.listdir(tiny_disk) if f.endswith(".mp4")) == [
        "a red circle moving left slowly.mp4", "a_b _quoted_ prompt ✨.mp4"]
