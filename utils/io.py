"""Atomic file writes: a file is written as ``.tmp-<8 hex>-<final name>`` in its folder (hidden, unique per writer,
extension kept for ffmpeg) and renamed only when complete, so code that skips existing outputs never keeps a broken
one. :func:`remove_stale_temps` deletes what killed writers left."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Iterable

TEMP_PREFIX = ".tmp-"
_TAG_LEN = 8   # hex digits of the per-writer tag


def is_temp(name: str | os.PathLike) -> bool:
    """Whether a file name is an :class:`AtomicPath` temporary."""
    return os.path.basename(os.fspath(name)).startswith(TEMP_PREFIX)


class AtomicPath:
    """A temporary path beside ``final`` (folder created) that replaces it on :meth:`commit` or is deleted on
    :meth:`discard`. ``with AtomicPath(final) as tmp:`` write ``tmp``; it becomes ``final`` only if the block
    succeeds."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:_TAG_LEN]}-{self.final.name}")

    def commit(self) -> None:
        """Flush the temporary file to disk, then give it the final name (the one atomic step)."""
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)   # the data is on disk before the name points at it (a crash cannot publish a hole)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        """Delete the temporary file if it exists; the final path is left as it was."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class CloseOrAbort:
    """Writer mixin: ``with`` calls :meth:`close` when the block succeeds, :meth:`abort` when it raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# Temporaries of the writers before this module (mp4 ``.tmp_<32 hex>.mp4``, latents ``.<name>.latents.pt.tmp``, ODE
# files ``<name>.pt.tmp``): no writer makes them any more, so one found is always stale.
_LEGACY_TEMP = re.compile(r"^(\.tmp_[0-9a-f]{32}\.mp4|\..+\.latents\.pt\.tmp|.+\.pt\.tmp)$")


def remove_stale_temps(folder: str | os.PathLike, finals: Iterable[str] | None = None) -> int:
    """Delete (and count) temporaries of killed writers in ``folder``, of the final names ``finals`` only when given
    (one rank never deletes another's in flight), and those of earlier versions' writers."""
    wanted = None if finals is None else {os.path.basename(f) for f in finals}
    removed = 0
    for entry in os.scandir(folder):
        ours = is_temp(entry.name) and (wanted is None or entry.name[len(TEMP_PREFIX) + _TAG_LEN + 1:] in wanted)
        if entry.is_file() and (ours or _LEGACY_TEMP.match(entry.name)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed += 1
    return removed
