"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP unpickles ``.metadata`` with plain :mod:`pickle` and loads non-tensor entries with ``weights_only=False``: a
planted folder could run any command on resume. Here the metadata unpickler admits only what DCP writes there, and
non-tensor entries load with ``weights_only=True``; anything else is refused with one line."""

from __future__ import annotations

import importlib
import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from utils.errors import CheckpointError, one_line

METADATA_FILE = ".metadata"   # DCP's global metadata file (rank-local ones are ``__<rank>.metadata``)
# Module -> names a DCP metadata pickle may refer to (recorded from what torch writes). Classes of
# ``torch.distributed.checkpoint.metadata`` are admitted by module: they are plain dataclasses and enums.
_ALLOWED = {
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP metadata classes; every other global (``os.system``, ``builtins.eval`` ...) is refused."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        if isinstance(found, type) and found.__module__ == module:   # defined there, not imported into it
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return getattr(importlib.import_module(module), name)
        raise CheckpointError(f"{self.source} refers to {module}.{name}, which DCP metadata never holds: refusing "
                              f"to load it (a tampered or foreign checkpoint; delete that folder to resume from the "
                              f"one before it)")


def read_metadata(path: str | os.PathLike) -> dcp_metadata.Metadata:
    """The metadata file ``path`` (``.metadata`` or ``__<rank>.metadata``), unpickled with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, os.fspath(path)).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated, not a pickle, unreadable
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with :func:`read_metadata` in place of its plain ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"   # global, or one rank's own
        metadata = read_metadata(self.fs.concat_path(self.path, name))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id   # as the parent does: this load's id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor entries with ``weights_only=True`` (the parent's
    ``load_bytes`` with only the ``torch.load`` call changed)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"checkpoint entry {fqn} holds objects other than tensors and plain values: "
                                  f"refusing to load it ({one_line(err)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
