"""Encode a folder of captioned videos into a latent LMDB for Stage 1 (the ``clean_data`` layout).

    python -m app.encode_videos --input_dir my_videos --lmdb_path dataset/my_clean_data \\
        --height 480 --width 832 --num_frames 81 --fps 16

The folder layouts, the frame sampling and the LMDB rows are described in :mod:`utils.encode_videos`, which does the
work; this module builds the Wan VAE the flags name and runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from model.vae import WanVAE
from pipeline.components import build_vae
from utils.config import load_config
from utils.encode_videos import encode_videos_to_lmdb, list_captioned_videos, read_all
from utils.errors import UserError
from utils.lmdb_store import DEFAULT_MAP_SIZE

logger = logging.getLogger(__name__)



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.encode_videos",
        description="Encode a folder of captioned .mp4 videos into a latent LMDB for Stage 1 "
                    "(data_path of trainer: diffusion). Layouts: captions.jsonl, captions.txt "
                    "(<file name><TAB><caption> per line) or a <name>.txt caption beside each <name>.mp4.")
    d = " (default: %(default)s)"
    p.add_argument("--input_dir", required=True, help="folder with the *.mp4 videos and their captions")
    p.add_argument("--lmdb_path", required=True, help="output LMDB folder (must not hold data yet)")
    p.add_argument("--height", type=int, default=480,
                   help="frame height after resize + centre crop (a multiple of 8)" + d)
    p.add_argument("--width", type=int, default=832,
                   help="frame width after resize + centre crop (a multiple of 8)" + d)
    p.add_argument("--num_frames", type=int, default=81,
                   help="pixel frames per video, 1 + 4k (81 -> 21 latent frames); shorter videos are skipped" + d)
    p.add_argument("--fps", type=float, default=16, help="frame rate at which the videos are sampled" + d)
    p.add_argument("--vae_path", default=None,
                   help="VAE weights: Wan2.1_VAE.pth, a folder holding it, or a diffusers VAE folder; "
                        "default: the VAE of --config, else <wan_models_dir>/<model_name>")
    p.add_argument("--config", default=None,
                   help="a stage YAML; its wan_models_dir/text_encoder_name locate the VAE (when no --vae_path)")
    p.add_argument("--wan_models_dir", default="wan_models", help="folder of the Wan model folders" + d)
    p.add_argument("--model_name", default="Wan2.1-T2V-1.3B", help="Wan model folder holding the VAE" + d)
    p.add_argument("--batch_size", type=int, default=1, help="videos per VAE call" + d)
    p.add_argument("--num_workers", type=int, default=4,
                   help="threads decoding videos ahead of the VAE, in order (0: decode in the main thread)" + d)
    p.add_argument("--device", default=None, help="device of the VAE; default cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="VAE weight dtype; default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--limit", type=int, default=None, help="encode at most this many videos (default: all)")
    p.add_argument("--map_size", type=int, default=DEFAULT_MAP_SIZE,
                   help="initial LMDB map size in bytes; doubled whenever full (default: 1 GiB)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for key in ("height", "width", "num_frames", "batch_size", "map_size"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1 (leave it out for all videos), got {args.limit}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.fps <= 0:
        raise UserError(f"--fps must be > 0, got {args.fps}")


def load_vae(args: argparse.Namespace):
    """The Wan VAE named by the flags (``--vae_path`` > ``--config`` > ``--wan_models_dir/--model_name``)."""

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.vae_path is None and args.config is not None:
        return build_vae(load_config(args.config), device=device, dtype=dtype)
    path = Path(args.vae_path or os.path.join(args.wan_models_dir, args.model_name))
    if path.is_dir() and (path / "vae" / "config.json").is_file() and not (path / "Wan2.1_VAE.pth").is_file():
        path = path / "vae"  # a diffusers-format Wan folder: its own config.json is the DiT's, not the VAE's
    return WanVAE.from_pretrained(path, torch_dtype=dtype).to(device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        _check_args(args)
        pairs = list_captioned_videos(args.input_dir)[:args.limit]
        vae = load_vae(args)
        s, t = vae.spatial_compression, vae.temporal_compression
        if args.height % s or args.width % s or (args.num_frames - 1) % t:
            raise UserError(f"--height/--width must be multiples of {s} and --num_frames 1 + {t}k, got "
                            f"{args.height}x{args.width}, {args.num_frames} frames")
        rows = encode_videos_to_lmdb(
            read_all(pairs, args.num_frames, args.fps, args.num_workers), vae, args.lmdb_path,
            height=args.height, width=args.width,
            num_frames=args.num_frames, batch_size=args.batch_size, map_size=args.map_size,
            progress=not args.no_progress, total=len(pairs))
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    skipped = len(pairs) - rows
    logger.info("wrote %d rows to %s%s", rows, args.lmdb_path, f" ({skipped} videos skipped)" if skipped else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
