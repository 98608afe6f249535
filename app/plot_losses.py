"""Draw the losses of a training run as a PNG (needs the ``plot`` extra, matplotlib).

    python -m app.plot_losses LOGDIR [--out FILE]      # LOGDIR/metrics.jsonl -> LOGDIR/losses.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from utils.errors import DataError, UserError


def plot_losses(logdir: str, out: Optional[str] = None) -> str:
    """Every ``*_loss`` column of ``<logdir>/metrics.jsonl`` against the step, one panel each (their scales differ),
    as a PNG at ``out`` (default ``<logdir>/losses.png``); returns its path."""
    path = os.path.join(logdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: pass a training logdir (train.py --logdir)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:   # a line cut short by a kill
                continue
            if isinstance(row, dict):
                rows.append(row)
    names = sorted({key for row in rows for key in row if key.endswith("_loss")})
    if not names:
        raise DataError(f"{path}: no *_loss values to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")   # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
        ax.plot(*zip(*points), linewidth=1)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.normpath(logdir)))
    fig.tight_layout()
    out = out or os.path.join(logdir, "losses.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.plot_losses",
                                     description="Draw the losses of LOGDIR/metrics.jsonl as a PNG.")
    parser.add_argument("logdir", help="training logdir (train.py --logdir) holding metrics.jsonl")
    parser.add_argument("--out", help="PNG file (default: LOGDIR/losses.png)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(plot_losses(args.logdir, args.out) + "\n")
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
