"""Resumable training checkpoints (torch.distributed.checkpoint) and the helpers of the release export.

``<logdir>/checkpoints/step_<N:06d>/`` (layout: docs/training_loop.md) is written into ``step_<N>.tmp/`` and renamed
once every rank has written, so a crash mid-save leaves the previous one the latest."""

from __future__ import annotations

import fcntl  # POSIX only, like the training runs
import json
import logging
import os
import random
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from utils import safe_dcp
from utils.distributed import all_ok, world
from utils.ema import ShardLocalEMA, canonical_name
from utils.errors import CheckpointError, ensure_folder, free_space, one_line
from utils.io import remove_stale_temps

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(logdir: str | os.PathLike, step: int) -> Path:
    return Path(logdir) / CHECKPOINTS / f"step_{step:06d}"


def release_path(logdir: str | os.PathLike, step: int) -> Path:
    """``<logdir>/checkpoint_model_<N:06d>/model.pt``: the reference's layout that README users copy."""
    return Path(logdir) / f"checkpoint_model_{step:06d}" / "model.pt"


def list_checkpoints(logdir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``logdir`` as ``(step, path)``, oldest first (``.tmp`` folders are not listed)."""
    metas = (Path(logdir) / CHECKPOINTS).glob("step_*/meta.json")
    return sorted((int(m.group(1)), meta.parent) for meta in metas
                  if (m := _STEP_DIR.match(meta.parent.name)) and meta.is_file())


def latest_checkpoint(logdir: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(logdir)
    return found[-1][1] if found else None


class LogdirLock:
    """An exclusive ``flock`` on ``<logdir>/.lock`` held by a run's rank 0: two runs on one logdir would save, prune and
    publish the same folders under each other. The kernel releases it when the holder dies, even by ``kill -9``; the
    file names the holder (pid, host) for the message."""

    NAME = ".lock"

    def __init__(self, logdir: str | os.PathLike):
        ensure_folder(logdir, "logdir")
        path = Path(logdir) / self.NAME
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise CheckpointError(f"{logdir} is in use by another training run ({holder}): wait for it to end or "
                                  f"pass another --logdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            # Unlock explicitly: forked DataLoader workers share the open file (and with it the lock) until they exit.
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def remove_stale_files(logdir: str | os.PathLike) -> int:
    """Delete what killed runs left in ``logdir`` (``step_<N>.tmp`` folders, ``.tmp-*`` files) and return the count;
    call it holding the :class:`LogdirLock`."""
    root = Path(logdir)
    removed = sum(remove_stale_temps(folder) for folder in [root, *root.glob("checkpoint_model_*")] if folder.is_dir())
    for stale in (root / CHECKPOINTS).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
        removed += 1
    if removed:
        logger.info("removed %d files or folders a killed run left in %s", removed, logdir)
    return removed


def read_meta(path: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    """What a resume checkpoint holds, by network name (the objective's phase names)."""

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    emas: dict[str, ShardLocalEMA]


def _dcp_state(state: TrainState) -> dict[str, Any]:
    """The DCP state dict: sharded model / optimizer states (canonical keys) and EMA shadows."""
    return {**{f"model/{name}": get_model_state_dict(model) for name, model in state.models.items()},
            **{f"optim/{name}": get_optimizer_state_dict(state.models[name], optimizer)
               for name, optimizer in state.optimizers.items()},
            **{f"ema/{name}": ema.state_dict() for name, ema in state.emas.items()}}


def _commit(tmp: Path, final: Path) -> None:
    """The one step that publishes a checkpoint: an atomic rename."""
    os.replace(tmp, final)


def save_checkpoint(logdir: str | os.PathLike, step: int, state: TrainState, data_state: dict, config_yaml: str,
                    keep: int = 3) -> Path:
    """Write the resume checkpoint of ``step`` (collective) and keep the newest ``keep``; returns its folder (an
    existing one is left as is). A failure on any rank (a full disk) removes the partial folder and raises a one-line
    CheckpointError on every rank; the previous checkpoint stays the latest."""
    w = world()
    final = checkpoint_path(logdir, step)
    if final.is_dir():
        return final
    tmp = final.with_name(final.name + ".tmp")
    error: Optional[BaseException] = None
    if w.is_main:
        error = _attempt(lambda: tmp.mkdir(parents=True))
    if all_ok(error is None):
        error = _attempt(lambda: _write(tmp, step, state, data_state, config_yaml))
    if all_ok(error is None) and w.is_main:   # every rank's files are complete: publish
        error = _attempt(lambda: (_commit(tmp, final), _prune(logdir, keep)))
    # every rank must learn of a failure, or the others would wait at the next collective
    if not all_ok(error is None):
        if w.is_main and not final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)   # frees the space a full disk needs
        latest = latest_checkpoint(logdir)
        cause = f"{type(error).__name__}: {one_line(error)}" if error is not None else "on another rank"
        kept = f"the latest checkpoint is still {latest.name}" if latest else "there is no checkpoint yet"
        raise CheckpointError(f"saving {final} failed ({cause}); {kept}{free_space(final.parent)}")
    logger.info("saved checkpoint %s", final)
    return final


def _write(tmp: Path, step: int, state: TrainState, data_state: dict, config_yaml: str) -> None:
    """Every file of a checkpoint into ``tmp`` (collective)."""
    w = world()
    dcp.save(_dcp_state(state), checkpoint_id=str(tmp))
    torch.save({"rng": rng_state(), "data": data_state}, tmp / f"rank_{w.rank:05d}.pt")
    if w.is_main:
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": w.world_size,
                "models": sorted(state.models), "optimizers": sorted(state.optimizers), "emas": sorted(state.emas)}
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _attempt(action) -> Optional[BaseException]:
    """Run ``action``; return its error (DCP's wrapper unwrapped to the rank's own), None when it succeeded."""
    try:
        action()
    except CheckpointException as err:
        return _unwrap(err)
    except Exception as err:
        return err
    return None


def _prune(logdir: str | os.PathLike, keep: int) -> None:
    for _, path in list_checkpoints(logdir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _unwrap(err: CheckpointException) -> BaseException:
    """The first failing rank's own exception inside DCP's wrapper."""
    for failure in err.failures.values():
        return failure[0] if isinstance(failure, tuple) else failure
    return err


def load_checkpoint(path: str | os.PathLike, state: TrainState) -> tuple[int, Optional[dict]]:
    """Load a resume checkpoint into ``state`` in place (collective); its EMAs must exist in ``state.emas`` already.
    Returns the step and this rank's data position (None when the world size changed and the position is per-rank)."""
    path = Path(path)
    meta = read_meta(path)
    for kind, have in (("models", state.models), ("optimizers", state.optimizers), ("emas", state.emas)):
        if sorted(have) != meta[kind]:
            raise CheckpointError(f"{path} holds {kind} {meta[kind]} but this run has {sorted(have)}: "
                                  f"is the logdir from another stage? use a new --logdir")
    target = _dcp_state(state)
    safe_dcp.read_metadata(path / safe_dcp.METADATA_FILE)   # refused here with one line, before DCP's collectives
    try:
        dcp.load(target, checkpoint_id=str(path), storage_reader=safe_dcp.SafeFileSystemReader(path),
                 planner=safe_dcp.SafeLoadPlanner())
    except CheckpointException as err:   # DCP wraps every rank's failure; ours carry a one-line message
        cause = _unwrap(err)
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise CheckpointError(f"{path}: loading failed ({type(cause).__name__}: {one_line(cause)})") from None
    for name, model in state.models.items():
        set_model_state_dict(model, target[f"model/{name}"])
    for name, optimizer in state.optimizers.items():
        set_optimizer_state_dict(state.models[name], optimizer, target[f"optim/{name}"])
    for name, ema in state.emas.items():
        ema.load_state_dict(target[f"ema/{name}"])

    w = world()
    if meta["world_size"] != w.world_size:
        # A data position marked world-size independent (one global sample stream, trainer/batches.py) is the same
        # in every rank's file: rank 0's continues the run at the same sample on any world size.
        extra = torch.load(path / "rank_00000.pt", map_location="cpu", weights_only=True)
        data = extra["data"] if isinstance(extra.get("data"), dict) and extra["data"].get("world_size_independent") \
            else None
        logger.warning("%s was written by %d ranks, this run has %d: weights, optimizer and EMA are resharded; "
                       "per-rank RNG restarts from the seed; the data position %s", path, meta["world_size"],
                       w.world_size, "continues (world-size independent)" if data else "restarts from the seed")
        return meta["step"], data
    extra = torch.load(path / f"rank_{w.rank:05d}.pt", map_location="cpu", weights_only=True)
    set_rng_state(extra["rng"])
    return meta["step"], extra["data"]


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict with canonical keys on rank 0, ``{}`` elsewhere. Collective."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {canonical_name(k): v for k, v in sd.items()}
