"""One metrics path: :class:`MetricAccumulator` sums on the device and reduces across ranks once per log step;
:class:`MetricsLogger` writes to the console, ``metrics.jsonl`` and W&B."""

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
from utils.distributed import multi_rank
from utils.errors import ConfigError, UserError, one_line
from utils.io import AtomicPath

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

    def _first_bad_step(self) -> int:
        """The first step with a non-finite checked value on any rank, or ``_NONE`` (collective; a host sync)."""
        first_bad = torch.where(self._first_bad < 0, _NONE, self._first_bad)
        if multi_rank():
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        return int(first_bad.item())

    def reduce(self) -> dict[str, float]:
        """Means over the adds since the last call, averaged over ranks; resets. Raises NonFiniteLossError.
        Collective (every rank must call it at the same step) and the host sync of a log step."""
        names = sorted(self._sums)
        means = [self._sums[n] / self._counts[n] for n in names]
        flags = [self._bad[n].float() if n in self._bad else torch.zeros((), device=self.device) for n in names]
        packed = torch.stack(means + flags) if names else torch.zeros(0, device=self.device)
        if multi_rank():
            dist.all_reduce(packed)  # SUM: gloo has no AVG
            packed[: len(names)] /= dist.get_world_size()
        values = packed.tolist()
        bad_step = self._first_bad_step()
        self._reset()
        if bad_step != _NONE:
            bad = [n for n, flag in zip(names, values[len(names):]) if flag > 0]
            shown = ", ".join(f"{n}={values[names.index(n)]:.4g}" for n in bad)
            raise NonFiniteLossError(f"non-finite loss at step {bad_step} ({shown}, averaged since the last log): "
                                     f"training diverged; lower the learning rate or check the data, then resume "
                                     f"from the last checkpoint")
        return dict(zip(names, values[: len(names)]))

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a checked loss was non-finite since the last reduce (collective; a host sync),
        so that a diverged model is never checkpointed."""
        if self._first_bad_step() != _NONE:
            self.reduce()  # raises with the names and values


class MetricsLogger:
    """Console + ``<logdir>/metrics.jsonl`` (none when ``logdir`` is empty) + W&B (``wandb_init``: the arguments of
    ``wandb.init``, None = off); every call is a no-op unless ``enabled`` (the main rank). Rows after ``start_step``
    (written before a kill, redone now) are dropped, so that every step has one row."""

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
        shown = [f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}"
                 for k, v in metrics.items()]
        logger.info(" | ".join([f"step {step}", *shown]))
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
    with AtomicPath(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)


def build_metrics_logger(cfg: Config, is_main: bool, start_step: int = 0) -> MetricsLogger:
    """The run's logger from the config: W&B only when ``wandb_mode`` is not ``disabled`` and ``--disable-wandb`` is
    not given; its key comes from the environment (``WANDB_API_KEY``), never from YAML."""
    wandb_init = None
    if cfg.wandb_mode != "disabled" and not cfg.disable_wandb:
        wandb_init = dict(project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode,
                          name=cfg.wandb_name or cfg.config_name, dir=cfg.wandb_save_dir or cfg.logdir or None,
                          config=config_to_dict(cfg))
    return MetricsLogger(cfg.logdir, enabled=is_main, wandb_init=wandb_init, start_step=start_step)

