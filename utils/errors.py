"""User-facing errors: anything a user can cause raises a :class:`UserError` whose one-line message names the problem
and the fix; entry scripts print that line instead of a traceback. Internal invariants stay ``assert``."""

import os
import shutil
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


class ConfigError(UserError, ValueError):
    """A config file or key is wrong."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class WeightsMissingError(UserError, FileNotFoundError):
    """A weights file or folder is missing; the message names the download command."""


class DataError(UserError):
    """A dataset or prompt file is missing, empty or malformed."""


class OutputError(UserError, OSError):
    """An output could not be written completely (a full disk, an unwritable folder, a path that is a file)."""


def key_mismatch(missing=(), unexpected=(), mismatched=(), limit: int = 8) -> str:
    """One line: ``missing keys (2): a, b; unexpected keys (1): c; shape mismatches (1): d: checkpoint (3,) vs model
    (4,)``, each group its count and first ``limit`` names (sets sorted); empty groups left out."""
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        items = [str(k) for k in (sorted(items) if isinstance(items, (set, frozenset)) else items)]
        if items:
            shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
            parts.append(f"{title} ({len(items)}): {shown}")
    return "; ".join(parts)


def state_dict_mismatch(expected: dict, given: dict) -> str:
    """:func:`key_mismatch` of loading ``given`` into a module whose state dict is ``expected`` (names and shapes);
    ``""`` when it fits."""
    shape = lambda t: tuple(t.shape)  # noqa: E731
    return key_mismatch([k for k in expected if k not in given], [k for k in given if k not in expected],
                        [f"{k}: checkpoint {shape(given[k])} vs model {shape(expected[k])}"
                         for k in expected if k in given and shape(given[k]) != shape(expected[k])])


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (``""`` when it has none)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def free_space(path: str | os.PathLike) -> str:
    """`` (N MiB free on that disk)`` for the nearest existing folder of ``path``, or ``""``."""
    path = Path(path).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    try:
        return f" ({shutil.disk_usage(path).free / 2**20:.0f} MiB free on that disk)"
    except OSError:
        return ""


def ensure_folder(path: str | os.PathLike, what: str) -> Path:
    """Create the output folder ``path`` or raise a one-line OutputError naming ``what`` (e.g. a flag)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{what} {path} cannot be created ({type(err).__name__}: {one_line(err)})") from None
    return path
