"""LMDB datasets in the reference (CausVid / Causal Forcing) on-disk layout, byte-compatible with the released data.

Key ``<array>_<i>_data`` (ASCII) -> row ``i``'s raw little-endian C-order bytes (``latents``, float16) or UTF-8 text
(``prompts``); key ``<array>_shape`` -> decimal integers, row count first (``"N 6 21 16 60 104"`` for ODE
trajectories, ``"N 1 21 16 60 104"`` for clean latents, ``prompts_shape = "N"``). The writer writes the shape keys
LAST, so an interrupted build leaves a database :class:`LMDBReader` refuses."""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import lmdb
import numpy as np

from utils.errors import DataError, ensure_folder, one_line
from utils.io import CloseOrAbort

logger = logging.getLogger(__name__)

LATENTS = "latents"
PROMPTS = "prompts"
ARRAYS = (LATENTS, PROMPTS)
LATENT_DTYPE = np.dtype("<f2")   # the format stores no dtype: float16, as in the released data
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB to start; the writer doubles it whenever a transaction does not fit.


def row_key(array: str, index: int) -> bytes:
    return f"{array}_{index}_data".encode("ascii")


def shape_key(array: str) -> bytes:
    return f"{array}_shape".encode("ascii")


def natural_key(name: str) -> list:
    """Sort key that orders ``x_2`` before ``x_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_lmdb_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


# py-lmdb allows one open environment per path and process, and an environment must not be used across fork().
# Readers therefore share one read-only environment per path, keyed by real path, and replace an inherited one.
_SHARED_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def open_env(path: str | os.PathLike) -> lmdb.Environment:
    """This process's shared read-only environment of ``path``."""
    key = os.path.realpath(path)
    entry = _SHARED_ENVS.get(key)
    if entry is not None and entry[0] != os.getpid():
        entry[1].close()  # inherited through fork(): unusable here, and it would block a fresh open
        entry = None
    if entry is None:
        with lmdb_errors(path):
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True,
                            max_readers=2048)
            try:
                check_length(env, path)
            except DataError:
                env.close()
                raise
        entry = _SHARED_ENVS[key] = (os.getpid(), env)
    return entry[1]


@contextlib.contextmanager
def lmdb_errors(path: str | os.PathLike, writing: bool = False) -> Iterator[None]:
    """py-lmdb's errors (not an LMDB, a corrupt page, a full disk) as one-line :class:`DataError`s."""
    try:
        yield
    except lmdb.Error as err:
        what, hint = ("could not be written", "is the disk full?") if writing else \
            ("is unreadable", "rebuild it or copy it again")
        raise DataError(f"LMDB {path} {what} ({type(err).__name__}: {one_line(err)}); {hint}") from None


def check_length(env: lmdb.Environment, path: str | os.PathLike) -> None:
    """Refuse a ``data.mdb`` shorter than its last page in use (an interrupted copy): LMDB reads pages through a
    memory map, where a page past the end of the file kills the process with SIGBUS instead of raising."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    if size < needed:
        raise DataError(f"LMDB {path} is truncated: data.mdb has {size} bytes but its pages need {needed} (an "
                        f"interrupted copy or download?); copy it again")


def close_env(path: str | os.PathLike) -> None:
    """Close the shared environment of ``path`` (readers reopen it on their next access)."""
    entry = _SHARED_ENVS.pop(os.path.realpath(path), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def _to_numpy(x) -> np.ndarray:
    """numpy array or torch tensor (any dtype or device) -> numpy array, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu")
        # bfloat16 has no numpy dtype; fp32 holds every fp16/bf16 value exactly
        return x.float().numpy() if x.dtype.is_floating_point else x.numpy()
    return np.asarray(x)


class LMDBWriter(CloseOrAbort):
    """Append-only writer of a ``latents`` + ``prompts`` LMDB (``with LMDBWriter(path) as w: w.append(...)``); shape
    keys on success only. A non-empty database is refused; ``map_size`` doubles whenever a transaction does not fit."""

    def __init__(self, path: str | os.PathLike, map_size: int = DEFAULT_MAP_SIZE):
        self.path = str(path)
        self.num_rows = 0
        self.row_shape: tuple[int, ...] | None = None
        if int(map_size) < 1:
            raise DataError(f"LMDB map size (--map_size) must be a positive number of bytes, got {map_size}")
        ensure_folder(self.path, "LMDB folder")
        close_env(self.path)  # a read-only handle of this process would block opening for writing
        with lmdb_errors(self.path, writing=True):
            self._env = lmdb.open(self.path, map_size=int(map_size), subdir=True, meminit=False)
            try:
                check_length(self._env, self.path)
                if self._env.stat()["entries"] > 0:
                    raise DataError(f"LMDB already holds data: {self.path} (remove it or choose another "
                                    f"--lmdb_path)")
            except DataError:
                self.abort()
                raise

    def append(self, latents, prompts: Sequence[str]) -> int:
        """Write rows ``latents [rows, *row_shape]`` and ``prompts`` in one transaction; returns the row count."""
        arr = _to_numpy(latents)
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        if arr.ndim < 1 or arr.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for latents of shape {tuple(arr.shape)}")
        if arr.shape[0] == 0:
            return self.num_rows
        if self.row_shape is None:
            self.row_shape = tuple(int(s) for s in arr.shape[1:])
        elif tuple(arr.shape[1:]) != self.row_shape:
            raise DataError(f"row shape {tuple(arr.shape[1:])} differs from earlier rows {self.row_shape} "
                            f"in {self.path}")
        with np.errstate(over="ignore"):  # overflow is checked just below, with a clearer message
            stored = np.ascontiguousarray(arr.astype(LATENT_DTYPE, copy=False))
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(stored).all() and np.isfinite(arr).all():
            raise DataError(f"latent values overflow float16 while writing {self.path}")
        items = []
        for i, row, text in zip(range(self.num_rows, self.num_rows + arr.shape[0]), stored, prompts):
            items += [(row_key(LATENTS, i), row.tobytes(order="C")), (row_key(PROMPTS, i), str(text).encode("utf-8"))]
        self._put(items)
        self.num_rows += arr.shape[0]
        return self.num_rows

    def _put(self, items: list[tuple[bytes, bytes]]) -> None:
        """One write transaction; on MapFullError it is rolled back, the map doubled, and the batch retried."""
        with lmdb_errors(self.path, writing=True):
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        for key, value in items:
                            txn.put(key, value)
                    return
                except lmdb.MapFullError:
                    new_size = self._env.info()["map_size"] * 2
                    logger.debug("LMDB %s full; growing map to %d bytes", self.path, new_size)
                    self._env.set_mapsize(new_size)

    def close(self) -> None:
        """Write the shape keys (marks the database complete) and close."""
        if self._env is None:
            return
        if self.num_rows == 0:
            self.abort()
            raise DataError(f"no rows were written to {self.path}")
        latents_shape = " ".join(map(str, (self.num_rows, *self.row_shape)))
        self._put([(shape_key(LATENTS), latents_shape.encode()), (shape_key(PROMPTS), str(self.num_rows).encode())])
        with lmdb_errors(self.path, writing=True):
            self._env.sync(True)
        self._env.close()
        self._env = None
        logger.info("wrote %d rows of shape %s to %s", self.num_rows, self.row_shape, self.path)

    def abort(self) -> None:
        """Close without shape keys: the database stays incomplete and readers refuse it."""
        if self._env is not None:
            self._env.close()
            self._env = None


def _read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape keys of the LMDB dataset at ``path``, refused with one line when missing, malformed or unequal."""
    if not os.path.isdir(path):
        raise DataError(f"LMDB not found: {path}")
    if not is_lmdb_dir(path):
        raise DataError(f"not an LMDB directory (no data.mdb): {path}")
    with lmdb_errors(path), open_env(path).begin() as txn:
        raw = {name: txn.get(shape_key(name)) for name in ARRAYS}
    missing = [name for name, value in raw.items() if value is None]
    if len(missing) == len(ARRAYS):
        raise DataError(f"LMDB has no shape keys (incomplete build, or not a dataset LMDB): {path}")
    if missing:
        raise DataError(f"LMDB {path} lacks shape keys for arrays {missing}")
    try:
        shapes = {name: tuple(int(s) for s in value.decode().split()) for name, value in raw.items()}
    except ValueError as err:
        raise DataError(f"malformed shape key in {path}: {err}") from None
    counts = {name: shape[0] for name, shape in shapes.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"arrays of {path} have different row counts: {counts}")
    return shapes


class LMDBReader:
    """Read-only view of one LMDB dataset, or of several shards read as one (global index = the shards concatenated
    in the given order); safe to pickle into DataLoader workers (each opens its own environment)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        single = isinstance(paths, (str, os.PathLike))
        self.paths = [os.fspath(p) for p in ([paths] if single else paths)]
        if not self.paths:
            raise DataError("no LMDB shards given")
        shapes = [_read_shapes(p) for p in self.paths]
        for path, shape in zip(self.paths[1:], shapes[1:]):
            if any(shape[a][1:] != shapes[0][a][1:] for a in ARRAYS):
                raise DataError(f"shard {path} has arrays {[shape[a] for a in ARRAYS]}, "
                                f"unlike {self.paths[0]} {[shapes[0][a] for a in ARRAYS]}")
        self._ends = np.cumsum([shape[LATENTS][0] for shape in shapes]).tolist()
        self._shapes = {a: (self._ends[-1], *shapes[0][a][1:]) for a in ARRAYS}
        self.path = self.paths[0] if single else os.path.commonpath(self.paths)

    @property
    def env(self) -> lmdb.Environment:
        """The environment of the first (or only) shard."""
        return open_env(self.paths[0])

    def __len__(self) -> int:
        return self._ends[-1]

    def shape(self, array: str) -> tuple[int, ...]:
        """Full shape of ``array`` (``LATENTS`` or ``PROMPTS``): ``(rows, *row_shape)``."""
        return self._shapes[array]

    def get(self, array: str, index: int):
        """Row ``index`` of ``array``: a prompt, or a read-only float16 array of the row shape."""
        row_shape = self.shape(array)[1:]
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows in {self.path}")
        index %= len(self)
        shard = bisect.bisect_right(self._ends, index)
        path, index = self.paths[shard], index - (self._ends[shard - 1] if shard else 0)
        with lmdb_errors(path), open_env(path).begin() as txn:
            value = txn.get(row_key(array, index))
        if value is None:
            raise DataError(f"row {index} of array {array!r} missing in {path} (incomplete build?)")
        if array == PROMPTS:
            return value.decode("utf-8")
        expected = int(np.prod(row_shape)) * LATENT_DTYPE.itemsize
        if len(value) != expected:
            raise DataError(f"row {index} of {array!r} in {path} has {len(value)} bytes, expected {expected} "
                            f"for float16 rows of shape {row_shape}")
        return np.frombuffer(value, dtype=LATENT_DTYPE).reshape(row_shape)

    def close(self) -> None:
        for path in self.paths:
            close_env(path)


def open_many(path: str | os.PathLike) -> LMDBReader:
    """One LMDB, or a directory of LMDB shards read in natural name order (``x_2`` before ``x_10``)."""
    if not os.path.isdir(path):
        raise DataError(f"LMDB not found: {path}")
    if is_lmdb_dir(path):
        return LMDBReader(path)
    shards = sorted((p for p in Path(path).iterdir() if is_lmdb_dir(p)), key=lambda p: natural_key(p.name))
    if not shards:
        raise DataError(f"no LMDB (data.mdb) in {path} or its sub-directories")
    return LMDBReader(shards)
