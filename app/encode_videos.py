"""Encode a folder of captioned videos into a latent LMDB for Stage 1 (the ``clean_data`` layout).

    python -m app.encode_videos --input_dir my_videos --lmdb_path dataset/my_clean_data \\
        --height 480 --width 832 --num_frames 81 --fps 16

Accepted folder layouts (video files are the ``*.mp4`` directly inside ``--input_dir``, in natural name order):

1. ``captions.jsonl``: one JSON object per line with the video's file name (relative to the folder) under ``video``,
   ``file``, ``path`` or ``name`` and its caption under ``caption``, ``prompt`` or ``text``. Only listed videos are
   encoded, in the file's order.
2. ``captions.txt``: one line per video, ``<file name><TAB><caption>``. Only listed videos are encoded, in order.
3. Sidecars: ``clip_001.mp4`` + ``clip_001.txt`` (the caption is the whole file, whitespace-collapsed). A video without
   a sidecar is skipped with a warning.

Giving both ``captions.jsonl`` and ``captions.txt`` is an error (ambiguous). Every video is resized (aspect kept) to
cover ``--height`` x ``--width``, centre-cropped to it, sampled at ``--fps`` and cut to its first ``--num_frames``
frames (``1 + 4k``), mapped to [-1, 1] and encoded with the Wan VAE (normalised posterior means). Rows are
``[1, F, 16, height/8, width/8]`` float16 with the caption as prompt, readable by
:class:`utils.datasets.LatentLMDBDataset`. Unreadable or too short videos are skipped with a warning.

:func:`encode_videos_to_lmdb` does the encoding for frames already in memory (e.g. :mod:`toy.world` clips), so
no mp4 has to be written first. It takes any object with the ``encode`` method of ``model.vae.WanVAE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from model.vae import WanVAE
from pipeline.components import build_vae
from utils.config import load_config
from utils.errors import DataError, UserError
from utils.lmdb_store import DEFAULT_MAP_SIZE, LMDBWriter, natural_key
from utils.video import imageio_v2

logger = logging.getLogger(__name__)

VIDEO_KEYS = ("video", "file", "path", "name")
CAPTION_KEYS = ("caption", "prompt", "text")


# ----------------------------------------------------------------------------------------------------------------------
# Frames


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, height, width, 3]``: scale (aspect kept, antialiased) so the frame covers
    the target, then cut the centre."""
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def open_video(path: str | os.PathLike):
    """An imageio ffmpeg reader of ``path`` (this starts the ffmpeg process; :func:`read_all` starts them all from its
    own thread and lets worker threads drain the pipes)."""
    return imageio_v2().get_reader(os.fspath(path), format="FFMPEG")


def read_frames(reader, path: str | os.PathLike, num_frames: int, fps: float) -> np.ndarray:
    """The first ``num_frames`` frames of an open reader sampled at ``fps`` (frame ``i`` = source frame
    ``floor(i * source_fps / fps)``), uint8 ``[num_frames, H, W, 3]``; closes the reader. Raises DataError when too
    short. Safe in a worker thread: it only drains ffmpeg's pipe."""
    with reader:
        source_fps = float(reader.get_meta_data().get("fps") or fps)
        wanted = [int(i * source_fps / fps + 1e-6) for i in range(num_frames)]
        frames: dict[int, np.ndarray] = {}
        for index, frame in enumerate(reader):
            if index in wanted:
                frames[index] = np.asarray(frame)
            if index >= wanted[-1]:
                break
    if len(frames) < len(set(wanted)):
        raise DataError(f"{path}: {len(frames)} frames at {fps} fps, need {num_frames} "
                        f"(source {source_fps:g} fps)")
    return np.stack([frames[i] for i in wanted])


def read_video(path: str | os.PathLike, num_frames: int, fps: float) -> np.ndarray:
    """:func:`read_frames` of :func:`open_video` (main thread)."""
    return read_frames(open_video(path), path, num_frames, fps)


# ----------------------------------------------------------------------------------------------------------------------
# Encoding


def _encode_batch(vae, clips: list[np.ndarray]) -> torch.Tensor:
    """uint8 clips ``[T, H, W, 3]`` (same shape) -> latents ``[B, F, C, h, w]`` float32 on the CPU."""
    device = getattr(vae, "device", torch.device("cpu"))
    pixels = torch.from_numpy(np.stack(clips)).to(device)                  # [B, T, H, W, 3] uint8
    pixels = pixels.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)   # [B, 3, T, H, W] in [-1, 1]
    with torch.no_grad():
        return vae.encode(pixels).float().cpu()


def encode_videos_to_lmdb(videos: Iterable[tuple[str, np.ndarray]], vae, lmdb_path: str | os.PathLike,
                          height: int | None = None, width: int | None = None, num_frames: int | None = None,
                          batch_size: int = 1, map_size: int = DEFAULT_MAP_SIZE, progress: bool = False,
                          total: int | None = None) -> int:
    """VAE-encode ``(caption, uint8 frames [T, H, W, 3])`` pairs into a ``clean_data`` LMDB; returns the row count.

    Args:
        videos: the clips; ``None`` items are skipped (a reader's way of saying "unreadable", already warned about).
        vae: an object with ``encode(pixels [B, 3, T, H, W] in [-1, 1]) -> [B, F, C, h, w]`` (``model.vae.WanVAE``),
            optionally ``device``.
        height, width: resize + centre-crop every clip to this size first (None: keep the clip's size).
        num_frames: keep the first ``num_frames`` frames (None: all). The VAE decides which counts it accepts
            (``1 + 4k`` for Wan).
        batch_size: clips per VAE call (consecutive clips of the same shape).
        progress: show a progress bar (``total`` clips, if known).
    Rows are ``[1, F, C, h, w]`` float16 with the caption as prompt (``utils.lmdb_store`` layout).
    """
    from tqdm import tqdm

    pending: list[tuple[str, np.ndarray]] = []
    with LMDBWriter(lmdb_path, map_size=map_size) as writer:
        def flush() -> None:
            if pending:
                latents = _encode_batch(vae, [clip for _, clip in pending])
                writer.append(latents[:, None], [caption for caption, _ in pending])
                pending.clear()

        for item in tqdm(videos, total=total, disable=not progress, unit="video", desc="encoding"):
            if item is None:
                continue
            caption, frames = item
            frames = np.asarray(frames)
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise DataError(f"clip {caption!r}: expected uint8 frames [T, H, W, 3], got {frames.dtype} "
                                f"{frames.shape}")
            if num_frames is not None:
                if frames.shape[0] < num_frames:
                    logger.warning("skipping %r: %d frames, need %d", caption, frames.shape[0], num_frames)
                    continue
                frames = frames[:num_frames]
            if height is not None and width is not None:
                frames = resize_center_crop(frames, height, width)
            if pending and pending[0][1].shape != frames.shape:
                flush()
            pending.append((caption, frames))
            if len(pending) == batch_size:
                flush()
        flush()
        return writer.num_rows


# ----------------------------------------------------------------------------------------------------------------------
# Folder layouts


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        name = next((row[k] for k in VIDEO_KEYS if k in row), None) if isinstance(row, dict) else None
        caption = next((row[k] for k in CAPTION_KEYS if k in row), None) if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(caption, str):
            raise DataError(f"{path}:{n}: need a video name ({'/'.join(VIDEO_KEYS)}) and a caption "
                            f"({'/'.join(CAPTION_KEYS)})")
        pairs.append((name, caption))
    return pairs


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab or not name.strip() or not caption.strip():
            raise DataError(f"{path}:{n}: expected '<file name><TAB><caption>'")
        pairs.append((name.strip(), caption))
    return pairs


def list_captioned_videos(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(video path, caption)`` for a folder in one of the layouts of the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"input folder not found: {folder}")
    jsonl, tsv = folder / "captions.jsonl", folder / "captions.txt"
    if jsonl.is_file() and tsv.is_file():
        raise DataError(f"{folder} has both captions.jsonl and captions.txt; keep one")
    if jsonl.is_file() or tsv.is_file():
        pairs = _read_jsonl(jsonl) if jsonl.is_file() else _read_tsv(tsv)
        found = [(folder / name, caption) for name, caption in pairs]
    else:
        found = []
        for video in sorted(folder.glob("*.mp4"), key=lambda p: natural_key(p.name)):
            sidecar = video.with_suffix(".txt")
            if sidecar.is_file():
                found.append((video, sidecar.read_text(encoding="utf-8-sig")))
            else:
                logger.warning("skipping %s: no caption (%s, captions.txt or captions.jsonl)", video, sidecar.name)
    found = [(path, " ".join(caption.split())) for path, caption in found]
    for path, caption in found:
        if not caption:
            raise DataError(f"empty caption for {path}")
    if not found:
        raise DataError(f"no captioned .mp4 videos in {folder}")
    return found


def _skip(path: Path, err: Exception) -> None:
    # a broken file must not stop a long encoding run; say which one and why
    logger.warning("skipping unreadable video %s: %s", path, str(err).splitlines()[0] if str(err) else err)


def _drain(reader, path: Path, caption: str, num_frames: int, fps: float) -> tuple[str, np.ndarray] | None:
    try:
        return caption, read_frames(reader, path, num_frames, fps)
    except Exception as err:
        _skip(path, err)
        return None


def read_all(pairs: list[tuple[Path, str]], num_frames: int, fps: float,
             num_workers: int = 0) -> Iterator[tuple[str, np.ndarray] | None]:
    """The decoded clips in the order of ``pairs`` (``None`` for an unreadable file, warned about).

    Every ffmpeg is started here, in the calling thread; with ``num_workers > 0`` that many threads drain the readers
    ahead of the consumer (the decoding itself runs in the ffmpeg processes), at most ``2 * num_workers`` clips in
    flight so memory stays bounded."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    def start(path: Path, caption: str, pool) -> Future | tuple[str, np.ndarray] | None:
        try:
            reader = open_video(path)
        except Exception as err:
            _skip(path, err)
            return None
        if pool is None:
            return _drain(reader, path, caption, num_frames, fps)
        return pool.submit(_drain, reader, path, caption, num_frames, fps)

    if num_workers <= 0:
        for path, caption in pairs:
            yield start(path, caption, None)
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="decode") as pool:
        in_flight: deque = deque()
        for path, caption in pairs:
            in_flight.append(start(path, caption, pool))
            if len(in_flight) >= 2 * num_workers:
                item = in_flight.popleft()
                yield item.result() if item is not None else None
        while in_flight:
            item = in_flight.popleft()
            yield item.result() if item is not None else None


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
