r"""Build an ODE-trajectory LMDB from a folder of per-sample ``.pt`` files.

    python utils/create_lmdb_iterative.py --data_path dataset/ODE6KCausal_framewise_latents \
        --lmdb_path dataset/ODE6KCausal_framewise

Files (``{prompt: trajectory [1, S, F, C, H, W] or [S, F, C, H, W]}`` from the ODE-pair generator) are read in
natural name order; a prompt already written is skipped (exact-string deduplication, as in the reference)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Run as a file (the published `python utils/<script>.py`), Python puts utils/ first on sys.path, where its modules
# would shadow others and `utils` would be whichever clone is installed: this checkout goes there instead.
if __name__ == "__main__" and not __package__:
    _utils = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [os.path.dirname(_utils)] + [p for p in sys.path if os.path.realpath(p or ".") != _utils]

import torch

from utils.errors import DataError, UserError
from utils.io import is_temp
from utils.lmdb_store import DEFAULT_MAP_SIZE, LMDBWriter, natural_key

logger = logging.getLogger(__name__)


def list_pt_files(data_path: str | os.PathLike) -> list[Path]:
    """``*.pt`` files of ``data_path`` in natural name order, without a killed writer's temporaries."""
    if not os.path.isdir(data_path):
        raise DataError(f"data folder not found: {data_path}")
    files = sorted((p for p in Path(data_path).glob("*.pt") if not is_temp(p)), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"no .pt files in {data_path}")
    return files


def load_ode_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One generator output file -> ``{prompt: trajectory [S, F, C, H, W]}``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable or unsafe pickle: name the file, keep the reason
        raise DataError(f"cannot load {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise DataError(f"{path} must hold a dict {{prompt: tensor}}")
    out = {}
    for prompt, tensor in data.items():
        if tensor.ndim == 6 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 5:
            raise DataError(f"{path}: trajectory for {prompt[:50]!r} has shape {tuple(tensor.shape)}; "
                            f"expected [1, S, F, C, H, W] or [S, F, C, H, W]")
        out[prompt] = tensor
    return out


def create_ode_lmdb(data_path: str | os.PathLike, lmdb_path: str | os.PathLike, map_size: int = DEFAULT_MAP_SIZE,
                    progress: bool = False) -> int:
    """Write every distinct prompt's trajectory from ``data_path/*.pt`` into a new LMDB. Returns the row count."""
    from tqdm import tqdm

    seen: set[str] = set()
    num_duplicates = 0
    with LMDBWriter(lmdb_path, map_size=map_size) as writer:
        for path in tqdm(list_pt_files(data_path), desc="building LMDB", unit="file", disable=not progress):
            fresh = {}
            for prompt, trajectory in load_ode_file(path).items():
                if prompt in seen:
                    num_duplicates += 1
                    continue
                seen.add(prompt)
                fresh[prompt] = trajectory
            if fresh:
                writer.append(torch.stack(list(fresh.values())), list(fresh))
        rows = writer.num_rows
    if num_duplicates:
        logger.info("skipped %d duplicate prompts", num_duplicates)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True,
                        help="folder of per-sample .pt files {prompt: tensor [1, S, F, C, H, W]} from the ODE-pair "
                             "generator")
    parser.add_argument("--lmdb_path", required=True, help="output LMDB directory; must not already hold data")
    parser.add_argument("--map_size", type=int, default=DEFAULT_MAP_SIZE,
                        help="initial LMDB map size in bytes; it doubles automatically when full "
                             "(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rows = create_ode_lmdb(args.data_path, args.lmdb_path, map_size=args.map_size, progress=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"wrote {rows} rows to {args.lmdb_path}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
