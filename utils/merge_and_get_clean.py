"""Extract ``clean_data`` (ground-truth latents + captions) from ODE-trajectory LMDB shards.

    python utils/merge_and_get_clean.py               # dataset/ODE6KCausal_chunkwise_<i> -> dataset/clean_data

Each ODE row ``[S, F, C, H, W]`` keeps only its last slot (the ground-truth VAE latent), stored as ``[1, F, C, H, W]``
float16 next to its prompt. Unlike the reference, nothing is deleted unless ``--delete_sources`` is given (the
reference removed both the chunkwise and the framewise shards, forcing a second download for stage 2); with it, only
the shards that were read are removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from utils.errors import UserError
from utils.merge_lmdb import find_shards, merge_lmdbs

logger = logging.getLogger(__name__)


def extract_clean(sources: Sequence[str | os.PathLike], dest: str | os.PathLike, batch_rows: int = 512,
                  delete_sources: bool = False, progress: bool = False) -> int:
    """Merge ``sources`` into ``dest`` keeping each row's last trajectory slot. Returns the row count."""
    return merge_lmdbs(sources, dest, keep_last_slot=True, batch_rows=batch_rows, delete_sources=delete_sources,
                       progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="dataset",
                        help="directory holding the shards <name>_<i> (default: %(default)s)")
    parser.add_argument("--name", default="ODE6KCausal_chunkwise",
                        help="shard base name to read (<data_dir>/<name>_<i>); chunkwise and framewise shards hold "
                             "the same ground-truth slot (default: %(default)s)")
    parser.add_argument("--sources", nargs="+", default=None,
                        help="LMDB directories to read instead of <data_dir>/<name>_<i> (e.g. an already merged "
                             "dataset/ODE6KCausal_chunkwise)")
    parser.add_argument("--output", default=None, help="output LMDB directory (default: <data_dir>/clean_data)")
    parser.add_argument("--batch_rows", type=int, default=512,
                        help="rows copied per write transaction (default: %(default)s)")
    parser.add_argument("--delete_sources", action="store_true",
                        help="delete the shards that were read after a successful extraction (default: keep them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output or os.path.join(args.data_dir, "clean_data")
    try:
        shards = args.sources or find_shards(args.data_dir, args.name)
        print(f"extracting clean latents of {len(shards)} LMDB(s) into {output}")  # noqa: T201
        rows = extract_clean(shards, output, batch_rows=args.batch_rows, delete_sources=args.delete_sources,
                             progress=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"wrote {rows} rows to {output}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
