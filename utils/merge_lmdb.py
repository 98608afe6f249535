"""Merge LMDB shards ``<name>_0, <name>_1, ...`` into one LMDB ``<name>``.

    python utils/merge_lmdb.py                        # dataset/ODE6KCausal_{framewise,chunkwise}_<i> -> ..._{...}
    python utils/merge_lmdb.py --data_dir dataset --names ODE6KCausal_chunkwise --delete_sources

Rows are copied in shard order (shard index numerically, then row index); all shards must have the same row shapes.
``--delete_sources`` deletes the shards once the merged database is complete and its row count checked."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

# Run as a file (the published `python utils/<script>.py`), Python puts utils/ first on sys.path, where its modules
# would shadow others and `utils` would be whichever clone is installed: this checkout goes there instead.
if __name__ == "__main__" and not __package__:
    _utils = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [os.path.dirname(_utils)] + [p for p in sys.path if os.path.realpath(p or ".") != _utils]

import numpy as np

from utils.errors import DataError, UserError
from utils.lmdb_store import LATENTS, PROMPTS, LMDBReader, LMDBWriter, is_lmdb_dir
from utils.published_data import SHARD_NAMES, shards_hint

logger = logging.getLogger(__name__)


def find_shards(data_dir: str | os.PathLike, name: str) -> list[Path]:
    """Directories ``data_dir/<name>_<i>`` (i an integer) holding an LMDB, sorted by i."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)$")
    found = []
    if os.path.isdir(data_dir):
        for path in Path(data_dir).iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir() and is_lmdb_dir(path):
                found.append((int(match.group(1)), path))
    if not found:
        raise DataError(f"no LMDB shards {name}_<i> in {data_dir}{shards_hint(data_dir, [name])}")
    return [path for _, path in sorted(found)]


def merge_lmdbs(sources: Sequence[str | os.PathLike], dest: str | os.PathLike, keep_last_slot: bool = False,
                batch_rows: int = 512, delete_sources: bool = False, progress: bool = False) -> int:
    """Copy every row of ``sources`` (in order) into a new LMDB ``dest``; returns the row count. ``keep_last_slot``
    turns ODE rows ``[S, F, C, H, W]`` into clean rows ``[1, F, C, H, W]`` (the ground truth, slot S-1);
    ``batch_rows`` rows are held and written at a time; ``delete_sources`` after a successful, verified merge."""
    from tqdm import tqdm

    if batch_rows < 1:
        raise UserError(f"batch_rows (--batch_rows) must be >= 1, got {batch_rows}")
    reader = LMDBReader(sources)
    row_shape = reader.shape(LATENTS)[1:]
    if keep_last_slot and len(row_shape) != 5:
        raise DataError(f"rows of shape {row_shape} have no trajectory slots to take the last of; expected "
                        f"[S, F, C, H, W]")
    # Sized from the sources so that the sparse map rarely needs to grow; the writer doubles it if needed.
    map_size = max(int(1.1 * sum(os.path.getsize(os.path.join(p, "data.mdb")) for p in sources)), 1 << 20)
    with LMDBWriter(dest, map_size=map_size) as writer:
        for start in tqdm(range(0, len(reader), batch_rows), desc=f"merging into {dest}", disable=not progress):
            stop = min(start + batch_rows, len(reader))
            rows = [reader.get(LATENTS, i) for i in range(start, stop)]
            if keep_last_slot:
                rows = [row[-1:] for row in rows]
            writer.append(np.stack(rows), [reader.get(PROMPTS, i) for i in range(start, stop)])
        total = writer.num_rows
    reader.close()
    merged = LMDBReader(dest)
    if len(merged) != len(reader):
        raise DataError(f"merged {dest} has {len(merged)} rows, expected {len(reader)}; sources kept")
    merged.close()
    if delete_sources:
        for path in sources:
            shutil.rmtree(path)
        logger.info("deleted %d source shards", len(sources))
    return total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="dataset",
                        help="directory holding the shards <name>_<i> (default: %(default)s)")
    parser.add_argument("--names", nargs="+", default=list(SHARD_NAMES),
                        help="shard base names; each <data_dir>/<name>_<i> set is merged into <data_dir>/<name> "
                             "(default: %(default)s)")
    parser.add_argument("--batch_rows", type=int, default=512,
                        help="rows copied per write transaction (default: %(default)s)")
    parser.add_argument("--delete_sources", action="store_true",
                        help="delete the shards after a successful, verified merge (default: keep them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    merged, missing = 0, []
    try:
        for name in args.names:
            try:
                shards = find_shards(args.data_dir, name)
            except DataError:  # e.g. only the chunkwise data was downloaded: merge what is there
                missing.append(name)
                continue
            dest = os.path.join(args.data_dir, name)
            print(f"merging {len(shards)} {name} shards into {dest}")  # noqa: T201
            rows = merge_lmdbs(shards, dest, batch_rows=args.batch_rows, delete_sources=args.delete_sources,
                               progress=True)
            print(f"wrote {rows} rows to {dest}")  # noqa: T201
            merged += 1
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 1
    if missing:
        shards = " or ".join(f"{name}_<i>" for name in missing)
        what = "skipping:" if merged else "error:"
        print(f"{what} no LMDB shards {shards} in {args.data_dir}{shards_hint(args.data_dir, missing)}",  # noqa: T201
              file=sys.stderr)
    return 0 if merged else 1


if __name__ == "__main__":
    sys.exit(main())
