"""Kill-resume loss equality for any stage objective, in this process.

:func:`kill_resume_losses` trains one config three ways through ``trainer/loop.py``: (A) uninterrupted, (B) the same
run killed while computing step ``kill_at`` (after the checkpoint of step ``kill_at`` -- ``log_iters`` divides it),
(C) B resumed from that checkpoint to the end. The kill is an exception that nothing in the loop catches
(``BaseException``, like ``KeyboardInterrupt``), raised after B has drawn its batch and part of its randomness for
that step: anything the resume fails to restore (RNG states, data position, optimizer, EMA) shows as a different loss
in C. Every loss of every phase and micro-batch is recorded by wrapping ``Objective.loss``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable


class Killed(BaseException):
    """The injected kill: a BaseException, so no ``except Exception`` in the code under test swallows it."""


def _record(objective, kill_at: int | None) -> dict[tuple[str, int], list[float]]:
    losses: dict[tuple[str, int], list[float]] = {}
    real = objective.loss

    def loss(phase, batch, step):
        value, metrics = real(phase, batch, step)   # the step's draws happen before the kill
        if step == kill_at:
            raise Killed(f"killed at step {step}")
        losses.setdefault((phase, step), []).append(value.item())
        return value, metrics

    objective.loss = loss
    return losses


def kill_resume_losses(make_objective: Callable, cfg, logdir: Path, steps: int = 4, kill_at: int = 2):
    """Losses ``{(phase, step): [per micro-batch]}`` of the uninterrupted run and of the resumed run (steps
    ``kill_at ..steps-1`` only). ``make_objective(cfg)`` builds a fresh objective."""
    from trainer.loop import Trainer
    from utils.checkpoint import latest_checkpoint

    def run(name: str, kill: int | None, **changes):
        run_cfg = dataclasses.replace(cfg, logdir=str(logdir / name), max_steps=steps, log_iters=kill_at, log_every=1,
                                      **changes)
        objective = make_objective(run_cfg)
        losses = _record(objective, kill)
        try:
            Trainer(run_cfg, objective).train()
        except Killed:
            assert kill is not None
        return losses

    uninterrupted = run("A", None, no_save=True)
    run("B", kill_at)
    assert latest_checkpoint(logdir / "B").name == f"step_{kill_at:06d}"
    resumed = run("B", None)
    assert sorted({step for _, step in resumed}) == list(range(kill_at, steps)), sorted(resumed)
    return uninterrupted, resumed


def assert_same_losses(uninterrupted: dict, resumed: dict, rel: float = 1e-6) -> None:
    """Every loss of the resumed run equals the uninterrupted run's at the same phase, step and micro-batch."""
    for key, values in resumed.items():
        expected = uninterrupted[key]
        assert len(values) == len(expected), key
        for got, want in zip(values, expected):
            assert abs(got - want) <= rel * max(abs(want), 1e-12), f"{key}: resumed {got!r}, uninterrupted {want!r}"
