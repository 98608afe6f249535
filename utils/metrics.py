"""One metrics path: accumulate detached tensors between log steps, reduce them once, write them everywhere.

* :class:`MetricAccumulator` sums detached scalars on the device between log steps and notes the first step whose loss
  was not finite, with device-side ops only. :meth:`MetricAccumulator.reduce` is the one host sync per log step: one
  all-reduce across ranks, one ``.tolist()``. A non-finite loss raises :class:`NonFiniteLossError` on all ranks at once.
* :class:`MetricsLogger` writes a console line (``logging``) and a JSON line to ``<logdir>/metrics.jsonl`` on rank 0,
  plus Weights & Biases when the config asks for it (imported lazily; the key comes from ``WANDB_API_KEY``).
* ``python -m utils.metrics plot LOGDIR [--out FILE]`` draws the losses of ``metrics.jsonl`` as a PNG
  (``LOGDIR/losses.png``; needs the ``plot`` extra, matplotlib).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from utils.config import Config, config_to_dict
from utils.errors import ConfigError, DataError, UserError, one_line
from utils.io import atomic_path

logger = logging.getLogger(__name__)
_NONE = 2**62  # "no non-finite step seen" for the MIN all-reduce


class NonFiniteLossError(UserError, RuntimeError):
    """A loss became NaN or infinite: training diverged (raised on every rank, naming the step and what to change;
    entry scripts print it as one line)."""


class MetricAccumulator:
    """Running sums of scalar metrics between log steps, kept on ``device`` (no host sync until :meth:`reduce`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)  # 1-based step, -1 = none
        self._bad: dict[str, torch.Tensor] = {}  # per checked name: was it ever non-finite (bool tensor)

    def add(self, name: str, value: torch.Tensor | float, step: int, must_be_finite: bool = False) -> None:
        """Add one value of ``name`` (mean over the adds is reported). ``step`` is the 1-based optimizer step; with
        ``must_be_finite`` the first step where the value was NaN/inf is remembered (device-side, no sync)."""
        value = torch.as_tensor(value, device=self.device).detach().float().mean()
        self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._counts[name] = self._counts.get(name, 0) + 1
        if must_be_finite:
            bad = ~torch.isfinite(value)
            self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
            self._bad[name] = self._bad[name] | bad if name in self._bad else bad

    @property
    def pending(self) -> bool:
        return bool(self._sums)

    def reduce(self) -> dict[str, float]:
        """Means over the adds since the last call, averaged over ranks; resets. Raises NonFiniteLossError.

        Collective (every rank must call it at the same step) and a host sync."""
        names = sorted(self._sums)
        means = [self._sums[n] / self._counts[n] for n in names]
        first_bad = torch.where(self._first_bad < 0, _NONE, self._first_bad)
        flags = [self._bad[n].float() if n in self._bad else torch.zeros((), device=self.device) for n in names]
        packed = torch.stack(means + flags) if names else torch.zeros(0, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)  # SUM: gloo has no AVG
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            packed[: len(names)] /= dist.get_world_size()
        values = packed.tolist()  # the one host sync of a log step
        bad_step = int(first_bad.item())
        self._reset()
        if bad_step != _NONE:
            bad = [n for n, flag in zip(names, values[len(names):]) if flag > 0]
            shown = ", ".join(f"{n}={values[names.index(n)]:.4g}" for n in bad)
            raise NonFiniteLossError(f"non-finite loss at step {bad_step} ({shown}, averaged since the last log): "
                                     f"training diverged; lower the learning rate or check the data, then resume "
                                     f"from the last checkpoint")
        return dict(zip(names, values[: len(names)]))

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a checked loss was non-finite since the last reduce (collective; a host sync).
        Called before saving so a diverged model is never checkpointed."""
        first_bad = self._first_bad.clone()
        first_bad = torch.where(first_bad < 0, _NONE, first_bad)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        if int(first_bad.item()) != _NONE:
            self.reduce()  # raises with the names and values


def format_metrics(metrics: dict[str, float], step: int) -> str:
    parts = [f"step {step}"]
    for name, value in metrics.items():
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"{name} {value}")
    return " | ".join(parts)


class MetricsLogger:
    """``log(metrics, step)`` / ``close()``: console + ``metrics.jsonl`` (+ W&B), on the main rank only.

    Args:
        logdir: folder of ``metrics.jsonl`` (none written when empty).
        enabled: False on non-main ranks (every call is then a no-op).
        wandb_init: keyword arguments of ``wandb.init`` when W&B is on, else None.
        start_step: the step the run starts from; rows of later steps (written before a kill, redone now) are
            removed from ``metrics.jsonl`` so that every step has one row.
    """

    def __init__(self, logdir: str, enabled: bool = True, wandb_init: Optional[dict[str, Any]] = None,
                 start_step: int = 0):
        self.enabled = enabled
        self._file = None
        self._wandb = None
        if not enabled:
            return
        if logdir:
            Path(logdir).mkdir(parents=True, exist_ok=True)
            path = os.path.join(logdir, "metrics.jsonl")
            _drop_rows_after(path, start_step)
            self._file = open(path, "a", encoding="utf-8")
        if wandb_init is not None:
            try:
                import wandb  # lazy: W&B is optional (an extra) and slow to import
            except ImportError:
                raise ConfigError("wandb_mode asks for Weights & Biases but wandb is not installed: "
                                  "pip install -e '.[wandb]', or pass --disable-wandb") from None
            self._wandb = wandb.init(**wandb_init)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        logger.info(format_metrics(metrics, step))
        if self._file is not None:
            try:
                self._file.write(json.dumps({"step": step, **metrics}) + "\n")
                self._file.flush()
            except OSError as err:   # a full disk: training goes on (the next checkpoint save says so, in one line)
                logger.warning("metrics.jsonl is no longer written (%s: %s)", type(err).__name__, one_line(err))
                self._file = None
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_videos(self, videos: dict[str, str], step: int) -> None:
        """Upload mp4 files to W&B (``{name: path}``); nothing without W&B."""
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Video(path, format="mp4") for name, path in videos.items()}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _drop_rows_after(path: str, step: int) -> None:
    """Keep only the rows of ``metrics.jsonl`` up to ``step`` (a resumed run logs the later steps again; a row cut
    short by a kill is dropped too). Rewritten through a temporary file, so a kill now loses nothing."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    if len(kept) == sum(1 for line in lines if line):
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)


def build_metrics_logger(cfg: Config, is_main: bool, start_step: int = 0) -> MetricsLogger:
    """The run's logger from the config: W&B only when ``wandb_mode`` is not ``disabled`` and ``--disable-wandb`` is
    not given; its key comes from the environment (``WANDB_API_KEY``), never from YAML."""
    use_wandb = cfg.wandb_mode != "disabled" and not cfg.disable_wandb
    wandb_init = None
    if use_wandb:
        wandb_init = dict(project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode,
                          name=cfg.wandb_name or cfg.config_name, dir=cfg.wandb_save_dir or cfg.logdir or None,
                          config=config_to_dict(cfg))
    return MetricsLogger(cfg.logdir, enabled=is_main, wandb_init=wandb_init, start_step=start_step)


def plot_losses(logdir: str, out: Optional[str] = None) -> str:
    """Every ``*_loss`` column of ``<logdir>/metrics.jsonl`` against the step, one panel each (their scales differ),
    as a PNG at ``out`` (default ``<logdir>/losses.png``); returns its path."""
    path = os.path.join(logdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: pass a training logdir (train.py --logdir)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:   # a line cut short by a kill
                continue
            if isinstance(row, dict):
                rows.append(row)
    names = sorted({key for row in rows for key in row if key.endswith("_loss")})
    if not names:
        raise DataError(f"{path}: no *_loss values to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")   # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
        ax.plot(*zip(*points), linewidth=1)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.normpath(logdir)))
    fig.tight_layout()
    out = out or os.path.join(logdir, "losses.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m utils.metrics", description="Training metrics tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="draw the losses of LOGDIR/metrics.jsonl as a PNG")
    plot.add_argument("logdir")
    plot.add_argument("--out", help="PNG file (default: LOGDIR/losses.png)")
    args = parser.parse_args()
    try:
        sys.stdout.write(plot_losses(args.logdir, args.out) + "\n")
    except UserError as err:
        sys.exit(f"error: {err}")
