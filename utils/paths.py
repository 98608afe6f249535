"""The repository's own files (shipped configs, toy model, prompts), found whatever the working directory: a relative
path that exists nowhere else falls back to the repository's file of that name (logged once per path)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
# Config keys holding paths that a shipped config may name relative to the repository.
PATH_KEYS = ("generator_ckpt", "data_path", "wan_models_dir")


def in_repository(path: str | Path) -> str:
    """``path`` when it exists (or is absolute), else the repository's path of that relative name when it exists
    there, else ``path`` unchanged (the caller reports it missing)."""
    path = str(path)
    if Path(path).is_absolute() or Path(path).exists() or not (REPO_ROOT / path).exists():
        return path
    return _announce(path, str(REPO_ROOT / path))


@functools.lru_cache(maxsize=None)
def _announce(path: str, found: str) -> str:
    logger.info("%s is not in the working directory: using the repository's %s", path, found)
    return found


def resolve_shipped_paths(node, config_path: str | Path) -> None:
    """In a YAML of the repository's ``configs/`` (a mapping ``node``), apply :func:`in_repository` to the
    :data:`PATH_KEYS` it sets; users' own YAMLs keep their paths as written."""
    if Path(config_path).resolve().is_relative_to(CONFIGS_DIR):
        for key in PATH_KEYS:
            if isinstance(node.get(key), str):
                node[key] = in_repository(node[key])
