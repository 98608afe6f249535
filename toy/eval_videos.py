r"""Evaluate toy-world videos written by ``inference.py`` against their prompts (see toy/eval.py).

    python -m toy.eval_videos --video_folder output/toy --data_path prompts/toy.txt \
        [--num_samples 4] [--out output/toy/toy_eval.json] [--num_real 64 --real_seed 0]

Videos are found by the names ``inference.py`` gives them: ``safe_output_name(prompt)`` in prompt-file order (a
repeated prompt gets ``_1``, ``_2``...), plus ``-k`` per sample when it ran with ``--num_samples`` > 1. Prompts that
do not follow the synthetic caption grammar are skipped with a warning; missing videos are listed. Prints a table
(per video and aggregate, with chance levels) and saves JSON: per-video and aggregate scores, chance levels, the
distance to real held-out clips and timings.

From Python, on in-memory clips: :func:`evaluate` (= ``toy.eval.evaluate_clips``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from toy.eval import SCORES, DetectorSettings, evaluate_clips
from toy.world import parse_caption
from utils.datasets import TextDataset
from utils.errors import DataError, UserError
from utils.video import read_mp4, safe_output_name

log = logging.getLogger(__name__)
evaluate = evaluate_clips  # the in-memory entry point: evaluate(prompts, videos, real=None, num_real=64, ...)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video_folder", required=True, help="folder of mp4 files written by inference.py")
    p.add_argument("--data_path", required=True,
                   help="the prompt file given to inference.py (one synthetic caption per line; a TAB-separated "
                        "extended prompt is ignored: names and scores use the short prompt)")
    p.add_argument("--num_samples", type=int, default=None,
                   help="the --num_samples inference.py ran with (default: detect per prompt: <name>.mp4, else "
                        "<name>-0.mp4, <name>-1.mp4, ...)")
    p.add_argument("--out", default=None, help="JSON output path (default: <video_folder>/toy_eval.json)")
    p.add_argument("--num_real", type=int, default=64,
                   help="real reference clips for the distance: the first N held-out clips of "
                        "toy.world.make_split(seed=--real_seed) at the videos' size; 0 skips the distance")
    p.add_argument("--real_seed", type=int, default=0, help="seed of the make_split giving the real reference clips")
    d = DetectorSettings()
    p.add_argument("--max_color_distance", type=float, default=d.max_color_distance,
                   help="RGB distance beyond which a pixel is not the prompt's colour")
    p.add_argument("--min_area_fraction", type=float, default=d.min_area_fraction,
                   help="smallest blob counted as the object, as a fraction of the frame")
    p.add_argument("--min_presence", type=float, default=d.min_presence,
                   help="fraction of frames that must show the object for 'colour present'")
    p.add_argument("--triangle_offset", type=float, default=d.triangle_offset,
                   help="centroid offset below the box centre (fraction of its height) that means 'triangle'")
    p.add_argument("--quiet", action="store_true", help="print only the aggregate table, not one row per video")
    return p.parse_args(argv)


def find_videos(folder: str, prompt_path: str, num_samples: int | None) -> tuple[list[tuple[str, str]], list]:
    """``([(prompt, mp4 path)], [(prompt, missing name)])`` named as pipeline/video_jobs.make_jobs names them."""
    prompts = TextDataset(prompt_path).prompts
    used: set[str] = set()
    found, missing = [], []
    for prompt in prompts:
        base = safe_output_name(prompt, used=used)  # every prompt takes its name, as in make_jobs, even if skipped
        if num_samples == 1 or (num_samples is None and os.path.exists(os.path.join(folder, base + ".mp4"))):
            names = [base]
        elif num_samples is not None:
            names = [f"{base}-{k}" for k in range(num_samples)]
        else:
            names, k = [], 0
            while os.path.exists(os.path.join(folder, f"{base}-{k}.mp4")):
                names.append(f"{base}-{k}")
                k += 1
            names = names or [base]
        for name in names:
            path = os.path.join(folder, name + ".mp4")
            if os.path.exists(path):
                found.append((prompt, path))
            else:
                missing.append((prompt, name))
    return found, missing


def load(folder: str, prompt_path: str, num_samples: int | None) -> tuple[list[str], list, list[str], dict]:
    """Read the videos whose prompts follow the grammar: (prompts, clips, names, bookkeeping for the JSON)."""
    found, missing = find_videos(folder, prompt_path, num_samples)
    unparsed = []
    for prompt in dict.fromkeys(p for p, _ in found + missing):
        try:
            parse_caption(prompt)
        except ValueError:
            unparsed.append(prompt)
    missing = [name for prompt, name in missing if prompt not in unparsed]
    prompts, clips, names = [], [], []
    start = time.perf_counter()
    for prompt, path in found:
        if prompt in unparsed:
            continue
        prompts.append(prompt)
        clips.append(read_mp4(path))
        names.append(os.path.basename(path))
    if missing:
        log.warning("%d videos missing, e.g. %s.mp4", len(missing), missing[0])
    if unparsed:
        log.warning("%d prompts do not follow the synthetic grammar, skipped, e.g. %r", len(unparsed), unparsed[0])
    if not clips:
        raise DataError(f"no evaluable videos in {folder} for the prompts of {prompt_path} "
                        f"({len(missing)} missing, {len(unparsed)} not synthetic captions)")
    info = {"missing": missing, "unparsed_prompts": unparsed, "read_seconds": time.perf_counter() - start}
    return prompts, clips, names, info


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(result: dict, per_video: bool = True) -> str:
    """Plain-text table: one row per video (optional), then the aggregate next to the chance levels."""
    cols = (*SCORES, "faithfulness", "centroid_step", "frame_diff", "area_stability")
    lines = []
    if per_video:
        lines.append(" | ".join(["video".ljust(48), *(c[:10].rjust(10) for c in cols)]))
        for row in result["videos"]:
            name = row.get("name", row["prompt"])[:48].ljust(48)
            lines.append(" | ".join([name, *(_fmt(row[c]).rjust(10) for c in cols)]))
        lines.append("")
    agg, chance = result["aggregate"], result["chance"]
    lines.append(f"{'score':<16}{'mean':>10}{'chance':>10}")
    for c in cols:
        lines.append(f"{c:<16}{_fmt(agg[c]):>10}{_fmt(chance.get(c)):>10}")
    dist = result["distance"]
    if dist.get("frechet") is not None or dist.get("nearest_neighbour") is not None:
        lines.append(f"distance to real ({dist['reference']}): frechet {_fmt(dist['frechet'])}, nearest neighbour "
                     f"{_fmt(dist['nearest_neighbour'])} (real-to-real {_fmt(dist['real_nearest_neighbour'])})")
    lines.append(f"{agg['count']} videos, {_fmt(agg['seconds_per_video'])} s per video")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prompts, clips, names, info = load(args.video_folder, args.data_path, args.num_samples)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = DetectorSettings(max_color_distance=args.max_color_distance, min_area_fraction=args.min_area_fraction,
                                min_presence=args.min_presence, triangle_offset=args.triangle_offset)
    start = time.perf_counter()
    result = evaluate_clips(prompts, clips, num_real=args.num_real, real_seed=args.real_seed, settings=settings,
                            names=names)
    result.update(info, video_folder=os.path.abspath(args.video_folder), data_path=os.path.abspath(args.data_path),
                  eval_seconds=time.perf_counter() - start)
    print(format_table(result, per_video=not args.quiet))
    out = args.out or os.path.join(args.video_folder, "toy_eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
