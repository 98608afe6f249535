"""Pictures of a training run: sample videos at each checkpoint (trainer/samples.py), loss curves as a PNG
(``python -m app.plot_losses``), and the W&B upload of the videos."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from app.plot_losses import plot_losses
from pipeline.streaming import StreamingPipeline
from tests.conftest import REPO_ROOT, write_tiny_stream_config
from trainer.loop import Trainer
from trainer.registry import build_objective
from utils.checkpoint import release_path
from utils.config import load_config
from utils.metrics import MetricsLogger
from utils.video import read_mp4, write_mp4

PROMPTS = ["a red circle moving left slowly", "a blue square moving up quickly"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, write_tiny_stream_config(root)


def overrides_of(root):
    """Two steps of tiny chunk-wise DMD (generator and critic: the Tiny folder) with a checkpoint at step 2."""
    return ["real_name=Tiny", "fake_name=Tiny", f"data_path={root / 'prompts.txt'}", "mixed_precision=false",
            "gradient_checkpointing=false", "max_steps=2", "log_iters=2"]


def train(world, logdir, *overrides):
    root, yaml = world
    cfg = load_config(yaml, [*overrides_of(root), f"logdir={logdir}", f"sample_prompts={json.dumps(PROMPTS)}",
                             *overrides])
    assert Trainer(cfg, build_objective(cfg)).train() == 2
    return cfg


def assert_samples_are_inference_of_the_export(cfg, logdir, threads=None):
    """The videos at step 2 are what inference makes of the exported checkpoint (same prompts, seed and length: 6
    latent frames, all the tiny geometry has), written by the same mp4 writer: the decoded files agree exactly (the
    tiny random VAE's noisy frames cost ~13 levels of H.264 error, so the frames themselves are not compared); with
    another seed they differ. ``threads``: the CPU threads the run used (float32 sums differ in their last bits with
    another thread count, enough to change the mp4)."""
    videos = sorted((logdir / "samples" / "step_000002").glob("*.mp4"))
    assert [v.stem for v in videos] == sorted(PROMPTS)
    pipe = StreamingPipeline.from_config(cfg, str(release_path(logdir, 2)), device="cpu")
    for seed, same in ((cfg.seed, True), (cfg.seed + 1, False)):
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            expected = pipe.generate(PROMPTS, num_latent_frames=6, seed=seed).frames
        finally:
            torch.set_num_threads(before)
        for i, prompt in enumerate(PROMPTS):
            write_mp4(logdir / "expected.mp4", expected[i], fps=cfg.fps)
            frames = read_mp4(logdir / "samples" / "step_000002" / f"{prompt}.mp4")
            assert frames.shape == (21, 32, 48, 3)
            assert np.array_equal(frames, read_mp4(logdir / "expected.mp4")) == same


def test_each_checkpoint_writes_sample_videos_of_the_saved_weights(world, tmp_path):
    assert_samples_are_inference_of_the_export(train(world, tmp_path), tmp_path)


def test_two_ranks_generate_together_and_rank_0_writes(world, tmp_path):
    """Under torchrun (gloo, CPU) the sharded generator's forwards are collectives: every rank runs them, rank 0
    writes the same videos as inference on the export."""
    root, yaml = world
    overrides = [*overrides_of(root), f"sample_prompts={json.dumps(PROMPTS)}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "train.py"), "--config_path", str(yaml), "--logdir", str(tmp_path), "--override", *overrides]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_samples_are_inference_of_the_export(load_config(yaml, overrides), tmp_path, threads=1)


def test_no_visualize_writes_none(world, tmp_path):
    train(world, tmp_path, "no_visualize=true")
    assert release_path(tmp_path, 2).is_file() and not (tmp_path / "samples").exists()


def test_without_ffmpeg_the_samples_are_latents_and_training_finishes(world, tmp_path, monkeypatch, caplog):
    """A machine whose imageio has no ffmpeg (imageio-ffmpeg not installed) keeps training: one warning, and the
    samples are the generated latents, those inference makes of the export."""
    monkeypatch.setattr("trainer.samples.mp4_writer_missing", lambda: "no ffmpeg for imageio (test)")
    with caplog.at_level("WARNING", logger="trainer.samples"):
        cfg = train(world, tmp_path)
    assert [r.getMessage() for r in caplog.records if r.name == "trainer.samples"] == [
        "sample videos are written as latents: no ffmpeg for imageio (test)"]
    folder = tmp_path / "samples" / "step_000002"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p}.latents.pt" for p in PROMPTS)
    pipe = StreamingPipeline.from_config(cfg, str(release_path(tmp_path, 2)), device="cpu")
    expected = pipe.generate(PROMPTS, num_latent_frames=6, seed=cfg.seed, output_type="latent").latents
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(torch.load(folder / f"{prompt}.latents.pt", weights_only=True), expected[i])


def test_loss_curves_png(tmp_path):
    rows = [{"step": s, "generator_loss": 1 / s, "critic_loss": 0.5 + s / 100, "step_time": 0.1} for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "gen')
    path = plot_losses(str(tmp_path))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[1] > image.size[0] / 2   # two panels, one over the other
    out = subprocess.run([sys.executable, "-m", "app.plot_losses", str(tmp_path), "--out",
                          str(tmp_path / "curves.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "curves.png")
    missing = subprocess.run([sys.executable, "-m", "app.plot_losses", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing' / 'metrics.jsonl'} not found: pass a training logdir (train.py --logdir)"]


def test_videos_go_to_wandb_when_it_is_on(tmp_path, monkeypatch):
    logged = []
    run = types.SimpleNamespace(log=lambda data, step: logged.append((data, step)), finish=lambda: None)
    fake = types.SimpleNamespace(init=lambda **kw: run, Video=lambda path, format: ("video", path, format))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(str(tmp_path), wandb_init={"project": "p"})
    logger.log_videos({"samples/0": "a.mp4"}, 4)
    assert logged == [({"samples/0": ("video", "a.mp4", "mp4")}, 4)]
    MetricsLogger(str(tmp_path)).log_videos({"samples/0": "a.mp4"}, 4)   # without W&B: nothing, no import
    assert len(logged) == 1


def test_missing_wandb_is_one_line(tmp_path, monkeypatch):
    from utils.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)   # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install -e '\.\[wandb\]'"):
        MetricsLogger(str(tmp_path), wandb_init={"project": "p"})
