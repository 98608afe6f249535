r"""Generate videos from a prompt file with a causal generator, streaming each block to the mp4 as it is decoded.

    python inference.py --config_path configs/causal_forcing_dmd_chunkwise.yaml \
        --checkpoint_path checkpoints/chunkwise/causal_forcing.pt --data_path prompts/demos.txt \
        --output_folder output/chunkwise [--use_ema]
    python inference.py --config_path configs/toy/causal_forcing_dmd_chunkwise.yaml \
        --prompt "a red circle moving down quickly" --output_folder output/toy

Under ``torchrun`` every rank takes its own share of the prompts. Existing videos are skipped unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import sys

from app.cli import add_model_flags
from utils.errors import UserError
from utils.paths import in_repository


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--data_path", help="prompt file, one prompt per line (TAB then an extended prompt optional); "
                                             "with --i2v: a folder with target_crop_info_<ratio>.json and <ratio>/ "
                                             "images (the published layout), or lines 'image_path<TAB>prompt'")
    prompts.add_argument("--prompt", help="one prompt, instead of a --data_path file")
    p.add_argument("--extended_prompt_path", help="file of extended prompts, one per line, parallel to --data_path")
    p.add_argument("--output_folder", required=True, help="where the mp4 files (and latents) are written")
    p.add_argument("--num_output_frames", type=int, default=None,
                   help="LATENT frames per video, the published unit (default: the config's training length, 21 "
                        "-> 81 video frames; F latent frames are 4F - 3 video frames); longer videos use a sliding "
                        "attention window")
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt (different seeds)")
    p.add_argument("--seed", type=int, default=0, help="base seed; video k of prompt i uses a seed derived from "
                                                       "(seed, i, k), so results do not depend on rank or skips")
    p.add_argument("--i2v", action="store_true", help="image-to-video: the image becomes the first latent frame")
    p.add_argument("--save_latents", action="store_true", help="also save the latents as <name>.latents.pt")
    p.add_argument("--overwrite", action="store_true", help="regenerate videos that already exist")
    p.add_argument("--report_timing", action="store_true",
                   help="print the first-frame latency, per-block times and FPS of every video after the first (a "
                        "warm-up); needs at least 2 videos. Times include decoding, not writing")
    args = p.parse_args(argv)
    if args.data_path is not None:
        args.data_path = in_repository(args.data_path)   # prompts/toy.txt from any working directory
    elif args.i2v or args.extended_prompt_path:
        p.error("--prompt is one text-to-video prompt: --i2v and --extended_prompt_path need --data_path")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from app.jobs import run_inference

        s = run_inference(args, report=print)
        print(f"{s['written']} videos written, {s['skipped']} skipped; {s['seconds_per_video']:.2f} s per video, "
              f"{s['fps']:.1f} frames per second (generation + decoding + writing)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
