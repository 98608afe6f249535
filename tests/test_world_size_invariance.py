"""World-size invariance of Stage 1 (issue 10): 2 ranks x batch 1 == 1 rank x 2 micro-batches, on CPU (gloo).

Both runs go through ``train.py`` with the shipped chunk-wise Stage-1 config on a tiny Wan folder and a 5-sample latent
LMDB (odd, so the 4 steps x 2 samples cross an epoch boundary mid-step). Caption dropout and context-noise
augmentation are on, so every kind of per-sample draw is exercised. The 2-rank run is launched with torchrun; the
1-rank run and the 2 -> 1 resume run in this process.

Tolerances: per-step losses 1e-5 relative and final parameters 1e-5 absolute. Step 1 is bit-identical (the same
samples, draws and weights, each sample in a batch of one); later steps differ only by fp32 summation order (one
all-reduce of two gradients vs two accumulated backward passes).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from toy.folders import write_tiny_wan_folder
from trainer.batches import GlobalStreamSampler
from utils.checkpoint import release_path
from utils.lmdb_store import LMDBWriter

LATENT = (6, 16, 4, 4)   # [F, C, H, W]: two chunk-wise blocks of 3 latent frames
NUM_SAMPLES = 5
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(root, **extra) -> list[str]:
    values = dict(wan_models_dir=root / "wan", generator_name="tiny", text_encoder_name="tiny",
                  data_path=root / "latents", image_or_video_shape=f"[1,{','.join(map(str, LATENT))}]",
                  mixed_precision="false", sharding_strategy="full", seed=5, lr=1e-3, beta1=0.9, batch_size=1,
                  total_batch_size=2, max_steps=STEPS, log_every=1, log_iters=2, caption_dropout=0.5,
                  noise_augmentation_max_timestep=250)
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_train(repo_root, root, logdir, ranks: int, **extra) -> None:
    argv = ["--config_path", str(repo_root / "configs" / "ar_diffusion_tf_chunkwise.yaml"), "--logdir", str(logdir),
            "--override", *overrides(root, **extra)]
    if ranks == 1:
        assert train.main(argv) == 0
        return
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "train.py", *argv]
    run = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def losses(logdir) -> dict[int, float]:
    lines = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["generator_loss"] for r in lines}


def params(logdir, step) -> dict[str, torch.Tensor]:
    return torch.load(release_path(logdir, step), map_location="cpu", weights_only=True)["generator"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root):
    """(root, logdir of 2 ranks, logdir of 1 rank)."""
    root = tmp_path_factory.mktemp("invariance")
    write_tiny_wan_folder(root / "wan" / "tiny")
    gen = np.random.default_rng(0)
    latents = gen.standard_normal((NUM_SAMPLES, 1, *LATENT)).astype(np.float32)   # clean rows [1, F, C, H, W]
    with LMDBWriter(root / "latents") as writer:
        writer.append(latents, [f"prompt number {i}" for i in range(NUM_SAMPLES)])
    run_train(repo_root, root, root / "two", ranks=2)
    run_train(repo_root, root, root / "one", ranks=1)
    return root, root / "two", root / "one"


def test_one_rank_with_accumulation_equals_two_ranks(runs):
    _, two, one = runs
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a[1] == b[1]   # the same samples, draws and weights: bit-identical
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    assert len(set(a.values())) == STEPS   # the steps really differ (new samples and draws each step)
    pa, pb = params(two, STEPS), params(one, STEPS)
    assert pa.keys() == pb.keys()
    start = params(two, 2)
    assert max((pa[k] - start[k]).abs().max().item() for k in pa) > 1e-4   # training moved the weights
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 1e-5


def test_two_rank_checkpoint_resumes_on_one_rank_at_the_same_sample(runs, repo_root):
    """The step-2 checkpoint of the 2-rank run, resumed on 1 rank: steps 3-4 equal the uninterrupted 2-rank run
    (the data position is world-size independent and the draws are keyed by sample)."""
    root, two, _ = runs
    logdir = root / "resumed"
    shutil.copytree(two, logdir)
    shutil.rmtree(logdir / "checkpoints" / f"step_{STEPS:06d}")
    shutil.rmtree(release_path(logdir, STEPS).parent)
    (logdir / "metrics.jsonl").write_text("")
    run_train(repo_root, root, logdir, ranks=1)
    a, resumed = losses(two), losses(logdir)
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert abs(a[step] - resumed[step]) <= 1e-5 * abs(a[step]), (step, a[step], resumed[step])


@pytest.mark.parametrize("world,batch,accum", [(1, 1, 6), (2, 1, 3), (3, 2, 1), (2, 3, 1), (6, 1, 1)])
def test_each_step_takes_the_same_global_positions(world, batch, accum):
    """Step s of any (world, batch, accumulation) with total 6 takes stream positions [6s, 6s + 6)."""
    total = world * batch * accum
    samplers = [GlobalStreamSampler(4, seed=1, num_replicas=world, rank=r) for r in range(world)]
    consumed = [0] * world
    for step in range(3):
        taken = []
        for _ in range(accum):
            for r, sampler in enumerate(samplers):
                taken += [sampler.position_of(consumed[r] + j) for j in range(batch)]
                consumed[r] += batch
        assert sorted(taken) == list(range(step * total, (step + 1) * total))
    assert {s.state_for(consumed[r])["position"] for r, s in enumerate(samplers)} == {3 * total}
    # Epochs are permutations, concatenated without dropping anything.
    one = GlobalStreamSampler(4, seed=1)
    assert sorted(one.index_at(p) for p in range(4)) == sorted(one.index_at(p) for p in range(4, 8)) == [0, 1, 2, 3]
