"""Two-rank runs under torchrun (gloo, CPU): shard-local EMA, exact resume, pruning, strategies, and 2 -> 1 resume.

One torchrun launch (tests/_dist_worker.py) runs every two-rank scenario and writes per-rank JSON; the tests below
read it. The 2 -> 1 resume then runs in this process on one rank.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests._dist_worker import ToyObjective, toy_config
from trainer.loop import Trainer
from utils.checkpoint import list_checkpoints, release_path
from utils.ema import canonical_name

NUM_RANKS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, repo_root):
    """Runs the worker once; returns (output folder, [result of rank 0, result of rank 1])."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NUM_RANKS}", "--nnodes=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "-m", "tests._dist_worker", str(out)]
    run = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(NUM_RANKS)]


def test_parameters_are_sharded(two_rank_run):
    _, results = two_rank_run
    assert all(r["world_size"] == NUM_RANKS and r["param_is_dtensor"] for r in results)


def test_shard_local_ema_equals_reference_on_full_parameters(two_rank_run):
    """fp32 shard-local EMA vs a float64 EMA of the gathered full parameters: 1e-6 covers fp32 rounding."""
    _, results = two_rank_run
    for r in results:
        assert r["ema_vs_reference"] < 1e-6


def test_resume_after_crash_equals_uninterrupted_run(two_rank_run):
    """Crash at step 3, resume from the step-2 checkpoint: same losses, weights and EMA (tolerance 1e-6; in practice
    bit-identical since gloo's reductions are deterministic)."""
    out, results = two_rank_run
    for r in results:
        assert r["B_crashed"] and r["B_latest"].endswith("step_000002")
        assert r["C_final_step"] == 6
        uninterrupted = dict((step, loss) for step, loss in r["A_losses"])
        assert [step for step, _ in r["C_losses"]] == [2, 3, 4, 5]
        for step, loss in r["C_losses"]:
            assert abs(loss - uninterrupted[step]) <= 1e-6 * max(1.0, abs(loss))
        assert r["C_params_vs_A"] <= 1e-6 and r["C_ema_vs_A"] <= 1e-6
    assert results[0]["A_losses"] != results[1]["A_losses"]  # ranks really see different data


def test_keeps_the_newest_checkpoints_and_every_release(two_rank_run):
    out, _ = two_rank_run
    assert [step for step, _ in list_checkpoints(out / "B")] == [4, 6]  # keep_checkpoints=2
    assert all(release_path(out / "B", s).is_file() for s in (2, 4, 6))
    assert sorted(p.name for p in (out / "B" / "checkpoints" / "step_000006").glob("rank_*.pt")) == [
        "rank_00000.pt", "rank_00001.pt"]


def test_other_strategies_compute_the_same_steps(two_rank_run):
    """no_shard (replicated) and HSDP (2 'nodes' x 1) match full sharding; 1e-5 allows a different reduction order."""
    _, results = two_rank_run
    for r in results:
        assert r["no_shard_mesh"] == [2, 1] and r["hybrid_full_mesh"] == [2, 1]
        for strategy in ("no_shard", "hybrid_full"):
            for (step, loss), (ref_step, ref) in zip(r[f"{strategy}_losses"], r["A_losses"]):
                assert step == ref_step and abs(loss - ref) <= 1e-5


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def test_resume_on_fewer_ranks(two_rank_run, tmp_path):
    """A 2-rank checkpoint resumes on 1 rank: weights and EMA are resharded exactly, and training continues."""
    out, _ = two_rank_run
    logdir = tmp_path / "run"
    shutil.copytree(out / "B", logdir)
    shutil.rmtree(logdir / "checkpoints" / "step_000006")
    obj = ToyObjective(toy_config(str(logdir), max_steps=4))
    trainer = Trainer(obj.cfg, obj)
    assert trainer.train() == 4 and obj.losses == []  # resumed at step 4, nothing left to do
    saved = torch.load(release_path(out / "B", 4), map_location="cpu", weights_only=True)
    live = {canonical_name(n): _full(p) for n, p in trainer.networks.trainable["generator"].named_parameters()}
    ema = trainer.emas["generator"].full_state_dict()
    for name in live:
        torch.testing.assert_close(live[name], saved["generator"][f"model.{name}"], rtol=0, atol=0)
        torch.testing.assert_close(ema[name], saved["generator_ema"][f"model.{name}"], rtol=0, atol=0)

    more = ToyObjective(toy_config(str(logdir), max_steps=6))
    assert Trainer(more.cfg, more).train() == 6
    assert [step for step, _ in more.losses] == [4, 5]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in more.losses)
