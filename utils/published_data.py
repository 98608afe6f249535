"""The published data the shipped configs read (``data_path``), and the commands of the published README that make
it, for the one-line error when it is missing."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

DATASET_REPO = "zhuhz22/Causal-Forcing-data"   # LMDB shards ODE6KCausal_{framewise,chunkwise}_<i> (ODE pairs)
PROMPTS_REPO, PROMPTS_FILE = "gdhe17/Self-Forcing", "vidprom_filtered_extended.txt"   # Stage 3's prompts
SHARD_NAMES = ("ODE6KCausal_framewise", "ODE6KCausal_chunkwise")
# a folder a shipped config reads -> the published script that makes it from the downloaded shards
MADE_FROM_SHARDS = {"clean_data": "merge_and_get_clean.py", **{name: "merge_lmdb.py" for name in SHARD_NAMES}}


def shards_download(data_dir: str | os.PathLike) -> str:
    """The command that downloads the published shards into ``data_dir``."""
    return f"hf download {DATASET_REPO} --local-dir {shlex.quote(str(data_dir))}"


def shards_hint(data_dir: str | os.PathLike, names) -> str:
    """``"; the published shards: <command>"`` when every shard base name of ``names`` is a published one."""
    return f"; the published shards: {shards_download(data_dir)}" if set(names) <= set(SHARD_NAMES) else ""


def published_data_hint(path: str | os.PathLike) -> str:
    """``"; get it with: <commands>"`` when ``path`` is one of the published datasets by its name, else ``""``."""
    path = Path(path)
    parent = shlex.quote(str(path.parent))
    if path.name in MADE_FROM_SHARDS:
        return (f"; get it with: {shards_download(path.parent)} && python utils/{MADE_FROM_SHARDS[path.name]} "
                f"--data_dir {parent}")
    if path.name == PROMPTS_FILE:
        return f"; get it with: hf download {PROMPTS_REPO} {PROMPTS_FILE} --local-dir {parent}"
    return ""
