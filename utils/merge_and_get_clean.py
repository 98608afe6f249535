"""Extract ``clean_data`` (ground-truth latents + captions) from ODE-trajectory LMDB shards.

    python utils/merge_and_get_clean.py               # dataset/ODE6KCausal_chunkwise_<i> -> dataset/clean_data

Each ODE row ``[S, F, C, H, W]`` keeps its last slot (the ground truth) as ``[1, F, C, H, W]``. Nothing is deleted
unless ``--delete_sources`` (the reference deleted every shard, forcing a second download for stage 2)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Run as a file (the published `python utils/<script>.py`), Python puts utils/ first on sys.path, where its modules
# would shadow others and `utils` would be whichever clone is installed: this checkout goes there instead.
if __name__ == "__main__" and not __package__:
    _utils = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [os.path.dirname(_utils)] + [p for p in sys.path if os.path.realpath(p or ".") != _utils]

from utils.errors import UserError
from utils.merge_lmdb import find_shards, merge_lmdbs


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
        rows = merge_lmdbs(shards, output, keep_last_slot=True, batch_rows=args.batch_rows,
                           delete_sources=args.delete_sources, progress=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"wrote {rows} rows to {output}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
