"""A toy objective for the training-loop tests, and the torchrun worker of tests/test_distributed_resume.py.

The toy is a 2-block MLP regression (it exposes ``.blocks`` like the Wan model) on synthetic samples drawn one by
one from a seeded generator, so ``k`` micro-batches of ``b`` samples hold the same samples as one batch of ``k·b``.
Its output layer has one row, so with 2 ranks FSDP2 shards it unevenly (one rank holds an empty shard).

Worker: ``python -m torch.distributed.run --nproc_per_node=2 -m tests._dist_worker OUT`` runs, in one process group,
(A) an uninterrupted 6-step run with a float64 reference EMA computed on gathered full parameters, (B) the same run
crashed at step 3 after the step-2 checkpoint, (C) its resume to step 6, then two steps with the ``no_shard`` and the
HSDP (``hybrid_full`` over two one-rank "nodes") strategies; each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from trainer.objective import Networks, Objective, Phase
from utils.config import Config
from utils.ema import canonical_name

IN_DIM, DIM = 4, 6


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h))


class ToyNet(nn.Module):
    """``[B, IN_DIM] -> [B, 1]`` through two residual blocks."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN_DIM, DIM)
        self.blocks = nn.ModuleList(ToyBlock(DIM) for _ in range(2))
        self.out = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)   # activation checkpointing is the loop's, applied from outside
        return self.out(h)


class ToyData:
    """Endless batches of ``(x [B, IN_DIM], y [B, 1])``; samples are drawn one at a time from a seeded generator."""

    def __init__(self, seed: int, batch_size: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        xs = [torch.randn(IN_DIM, generator=self.gen) for _ in range(self.batch_size)]
        self.index += self.batch_size
        x = torch.stack(xs)
        return x, torch.sin(x).sum(dim=1, keepdim=True)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.index = state["index"]


class ToyObjective(Objective):
    """Regression with a little target noise drawn from the global RNG (so resume must restore RNG states).

    ``crash_at`` raises at that step; ``nan_at`` makes that step's loss NaN; ``noise=False`` for exact comparisons;
    ``track_ema`` keeps a float64 EMA of the gathered full parameters (collective) as an independent reference."""

    def __init__(self, cfg: Config, crash_at: int | None = None, nan_at: int | None = None, noise: bool = True,
                 track_ema: bool = False, model_factory=ToyNet):
        self.cfg = cfg
        self.crash_at, self.nan_at, self.noise, self.track_ema = crash_at, nan_at, noise, track_ema
        self.model_factory = model_factory
        self.losses: list[tuple[int, float]] = []
        self.ema_reference: dict[str, torch.Tensor] | None = None

    def build_networks(self, device: torch.device) -> Networks:
        return Networks(trainable={"generator": self.model_factory().to(device)})

    def phases(self) -> list[Phase]:
        c = self.cfg
        return [Phase("generator", lr=c.lr, betas=(c.beta1, c.beta2), max_grad_norm=c.max_grad_norm_generator,
                      ema=True)]

    def data(self, rank: int, world_size: int, seed: int):
        self._data = ToyData(seed * 1000 + rank, self.cfg.batch_size)
        return self._data

    def data_state(self) -> dict:
        return self._data.state_dict()

    def load_data_state(self, state: dict) -> None:
        self._data.load_state_dict(state)

    def loss(self, phase: str, batch, step: int):
        if step == self.crash_at:
            raise RuntimeError(f"injected crash at step {step}")
        x, y = (t.to(self.networks.trainable[phase].out.weight.device) for t in batch)
        if self.noise:
            y = y + 0.01 * torch.randn_like(y)
        loss = F.mse_loss(self.networks.trainable[phase](x), y)
        if step == self.nan_at:
            loss = loss * float("nan")
        self.losses.append((step, loss.item()))  # a host sync: fine in a test
        return loss, {"target_mean": y.mean()}

    def ema_updated(self, phase: str, ema, step: int) -> None:
        if not self.track_ema:
            return
        full = {canonical_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().double()
                for n, p in self.networks.trainable[phase].named_parameters()}
        if self.ema_reference is None:
            self.ema_reference = full
        else:
            d = ema.decay
            self.ema_reference = {n: d * self.ema_reference[n] + (1 - d) * full[n] for n in full}


def toy_config(logdir: str, **overrides) -> Config:
    """A CPU config for the toy: fp32 (sharded over several ranks; one rank runs it without FSDP2), EMA from step 1,
    logs every step, checkpoints every 2 steps."""
    values = dict(trainer="diffusion", logdir=logdir, seed=3, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.01,
                  mixed_precision=False, gradient_checkpointing=True, sharding_strategy="full", batch_size=2,
                  max_steps=6, log_iters=2, log_every=1, ema_weight=0.9, ema_start_step=1, max_grad_norm_generator=1.0)
    values.update(overrides)
    return Config(**values)


# ---------------------------------------------------------------------------------------------------------------------
# torchrun worker


def _full(named) -> dict[str, torch.Tensor]:
    """Full tensors of ``(name, parameter or EMA shadow)`` pairs on every rank, by canonical name."""
    return {canonical_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].cpu().double() - b[k].cpu().double()).abs().max().item() for k in a)


def main(out: Path) -> None:
    from trainer.loop import Trainer
    from utils.checkpoint import latest_checkpoint
    from utils.distributed import close_distributed, init_distributed

    w = init_distributed()
    result: dict = {"rank": w.rank, "world_size": w.world_size}

    # A: uninterrupted, with the reference EMA on full parameters.
    obj_a = ToyObjective(toy_config(str(out / "A"), no_save=True), track_ema=True)
    trainer_a = Trainer(obj_a.cfg, obj_a)
    trainer_a.train()
    model_a = trainer_a.networks.trainable["generator"]
    ema_a = _full(trainer_a.emas["generator"].shadow.items())
    result["A_losses"] = obj_a.losses
    result["param_is_dtensor"] = all(isinstance(p, DTensor) for p in model_a.parameters())
    result["ema_vs_reference"] = _max_diff(ema_a, obj_a.ema_reference)
    params_a = _full(model_a.named_parameters())

    # B: the same run, crashed at step 3 (after the step-2 checkpoint).
    obj_b = ToyObjective(toy_config(str(out / "B")), crash_at=3)
    try:
        Trainer(obj_b.cfg, obj_b).train()
        result["B_crashed"] = False
    except RuntimeError as err:
        result["B_crashed"] = "injected crash" in str(err)
    result["B_latest"] = str(latest_checkpoint(out / "B"))

    # C: resume B to step 6, keeping the 2 newest checkpoints.
    obj_c = ToyObjective(toy_config(str(out / "B")))
    trainer_c = Trainer(obj_c.cfg, obj_c, keep_checkpoints=2)
    result["C_final_step"] = trainer_c.train()
    result["C_losses"] = obj_c.losses
    result["C_params_vs_A"] = _max_diff(_full(trainer_c.networks.trainable["generator"].named_parameters()), params_a)
    result["C_ema_vs_A"] = _max_diff(_full(trainer_c.emas["generator"].shadow.items()), ema_a)

    # The other strategies compute the same first steps: replicate (no_shard) and HSDP, with 2 "nodes" of 1 rank.
    for strategy, ranks_per_node in (("no_shard", None), ("hybrid_full", "1")):
        saved = os.environ.get("LOCAL_WORLD_SIZE")
        if ranks_per_node:
            os.environ["LOCAL_WORLD_SIZE"] = ranks_per_node
        obj = ToyObjective(toy_config(str(out / strategy), no_save=True, max_steps=2, sharding_strategy=strategy))
        trainer = Trainer(obj.cfg, obj)
        trainer.train()
        if saved is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = saved
        result[f"{strategy}_losses"] = obj.losses
        result[f"{strategy}_mesh"] = list(next(trainer.networks.trainable["generator"].parameters()).device_mesh.shape)

    (out / f"rank{w.rank}.json").write_text(json.dumps(result))
    close_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
