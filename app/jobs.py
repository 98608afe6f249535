"""The work behind ``inference.py``: prompts -> jobs -> streamed mp4 files, with a summary.

Kept out of the entry script so it can be tested and reused (the toy recipe names its videos and seeds the same way).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from app.cli import config_from_args, pipeline_from_args
from pipeline.streaming import StreamChunk, StreamingPipeline
from utils.datasets import TextDataset, read_prompt_lines
from utils.errors import DataError, UserError, ensure_folder
from utils.io import AtomicPath, remove_stale_temps
from utils.video import Mp4StreamWriter, safe_output_name

log = logging.getLogger(__name__)


@dataclass
class Job:
    index: int            # prompt index in the file
    sample: int           # sample number of this prompt
    prompt: str           # text given to the model (the extended prompt when there is one)
    name: str             # output file stem
    seed: int
    image: str | None = None


def video_seed(base: int, index: int, sample: int, num_samples: int) -> int:
    """Seed of one video: a function of (base seed, prompt index, sample), never of rank or skipped files."""
    return (base * 1_000_003 + index * num_samples + sample) % (2**63)


def make_jobs(args, rank: int, world: int) -> list[Job]:
    """Every (prompt, sample) of the file, named once for all ranks, then this rank's share."""
    images: list[str | None]
    if args.i2v:
        images, prompts = map(list, zip(*read_image_prompts(args.data_path)))
        texts = prompts
    elif args.prompt is not None:   # inference.py --prompt
        prompts, texts, images = [args.prompt], [args.prompt], [None]
    else:
        ds = TextDataset(args.data_path, args.extended_prompt_path)
        items = [ds[i] for i in range(len(ds))]
        prompts = [it["prompts"] for it in items]
        texts = [it.get("extended_prompts", it["prompts"]) for it in items]
        images = [None] * len(prompts)
    used: set[str] = set()
    jobs = []
    for i, (prompt, text, image) in enumerate(zip(prompts, texts, images)):
        base = safe_output_name(prompt, used=used)
        for k in range(args.num_samples):
            name = base if args.num_samples == 1 else f"{base}-{k}"
            jobs.append(Job(i, k, text, name, video_seed(args.seed, i, k, args.num_samples), image))
    return jobs[rank::world]


I2V_METADATA_GLOB = "target_crop_info_*.json"   # the published I2V folder: this file and a sub-folder of images


def read_image_prompts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(image path, caption)`` pairs for image-to-video, from either layout:

    * a folder as the published code reads it: one ``target_crop_info_<ratio>.json`` (a list of items with at least
      ``file_name`` and ``caption``; the crop fields are not used) and the images under ``<ratio>/``;
    * a text file of ``image_path<TAB>prompt`` lines (relative image paths are relative to the file).
    """
    path = os.fspath(path)
    pairs = _read_i2v_folder(path) if os.path.isdir(path) else _read_i2v_file(path)
    if not pairs:
        raise DataError(f"I2V prompts are empty: {path}")
    return pairs


def _read_i2v_folder(folder: str) -> list[tuple[str, str]]:
    found = sorted(glob.glob(os.path.join(folder, I2V_METADATA_GLOB)))
    if len(found) != 1:
        raise DataError(f"I2V folder {folder} must hold exactly one {I2V_METADATA_GLOB}, found {len(found)}"
                        + (f" ({', '.join(os.path.basename(f) for f in found)})" if found else ""))
    meta = found[0]
    ratio = os.path.splitext(os.path.basename(meta))[0].rsplit("_", 1)[-1]
    image_dir = os.path.join(folder, ratio)
    try:
        with open(meta, encoding="utf-8") as f:
            items = json.load(f)
        pairs = [(os.path.join(image_dir, item["file_name"]), item["caption"].strip()) for item in items]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{meta}: expected a JSON list of {{'file_name', 'caption'}} items ({type(err).__name__}: "
                        f"{err})") from err
    for image, _ in pairs:
        if not os.path.isfile(image):
            raise DataError(f"{meta}: image not found: {image} (images live in the '{ratio}' sub-folder)")
    return pairs


def _read_i2v_file(path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise DataError(f"I2V prompts not found: {path} (expected a file of 'image_path<TAB>prompt' lines or a "
                        f"folder with {I2V_METADATA_GLOB})")
    pairs = []
    for n, text in read_prompt_lines(path):
        if "\t" not in text:
            raise DataError(f"{path}:{n}: expected 'image_path<TAB>prompt'")
        image, prompt = text.split("\t", 1)
        image = image if os.path.isabs(image) else os.path.join(os.path.dirname(path), image)
        if not os.path.isfile(image):
            raise DataError(f"{path}:{n}: image not found: {image}")
        pairs.append((image, prompt.strip()))
    return pairs


def image_pixels(path: str, height: int, width: int) -> torch.Tensor:
    """An image as the published I2V reads it: RGB, resized to exactly ``height x width`` (aspect ratio not kept) with
    PIL's bilinear filter -- what torchvision's ``Resize`` does to a PIL image, antialiased when shrinking -- then
    scaled to [-1, 1]. float32 ``[3, H, W]``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def load_image_latent(pipe: StreamingPipeline, path: str, height: int, width: int) -> torch.Tensor:
    """An image (:func:`image_pixels`) -> its VAE latent ``[1, 1, C, h, w]``."""
    pixels = image_pixels(path, height, width)[None, :, None].to(pipe.device, pipe.vae.dtype)  # [1, 3, 1, H, W]
    with torch.no_grad():
        return pipe.vae.encode(pixels).to(pipe.dtype)


def run_inference(args, report: Callable[[str], None] = log.info) -> dict:
    """Generate every job of this rank; returns (and logs) the summary. With ``args.report_timing`` the timing of
    every video after the first goes to ``report`` (:func:`timing_line`)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
    cfg = config_from_args(args)
    jobs = make_jobs(args, rank, world)
    num_frames = args.num_output_frames or cfg.image_or_video_shape[1]
    if num_frames < 1:
        raise UserError(f"--num_output_frames must be >= 1, got {num_frames}")
    from model.masks import BlockLayout
    try:
        BlockLayout(cfg.num_frame_per_block, cfg.independent_first_frame).block_sizes(num_frames - args.i2v)
    except ValueError as e:
        raise UserError(f"--num_output_frames {num_frames}: {e}") from None
    ensure_folder(args.output_folder, "--output_folder")
    device = torch.device(args.device) if args.device else None
    if device is None and world > 1 and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    # Temporaries a killed run left for this rank's videos (another rank's may be in flight: not touched).
    remove_stale_temps(args.output_folder, [_path(args, j) for j in jobs] + [_latents_path(args, j) for j in jobs])
    todo = [j for j in jobs if args.overwrite or not os.path.exists(_path(args, j))]
    log.info("rank %d/%d: %d videos, %d already done", rank, world, len(jobs), len(jobs) - len(todo))
    summary = {"written": 0, "skipped": len(jobs) - len(todo), "seconds": 0.0, "frames": 0}
    if not todo:
        return _report(summary)
    pipe = pipeline_from_args(args, cfg, device)
    timing = args.report_timing and len(todo) >= 2
    if args.report_timing and not timing:
        report(f"--report_timing needs at least 2 videos to generate (the first one warms up), got {len(todo)}: "
               f"timing is off")
    for i, job in enumerate(todo):
        frames, seconds = _generate(pipe, cfg, args, job, num_frames, report if timing and i >= 1 else None)
        summary["written"] += 1
        summary["seconds"] += seconds
        summary["frames"] += frames
    return _report(summary)


def _path(args, job: Job) -> str:
    return os.path.join(args.output_folder, job.name + ".mp4")


def _latents_path(args, job: Job) -> str:
    return os.path.join(args.output_folder, job.name + ".latents.pt")


def _generate(pipe: StreamingPipeline, cfg, args, job: Job, num_frames: int,
              report: Callable[[str], None] | None = None) -> tuple[int, float]:
    """One video, written block by block; returns (pixel frames, seconds). With ``report`` the video is timed: the
    stream runs to its end with nothing else in between (the frames are written afterwards) and
    :func:`timing_line` goes to ``report``."""
    start = time.perf_counter()
    initial = None
    if job.image is not None:
        initial = load_image_latent(pipe, job.image, cfg.height, cfg.width)
        num_frames -= 1
    opened = time.perf_counter()
    stream = pipe.open(job.prompt, num_latent_frames=num_frames, seed=job.seed, initial_latent=initial,
                       uint8=True)
    source = stream if report is None else list(stream)
    if report is not None:
        report(timing_line(job.name, source, time.perf_counter() - opened))
    latents, written = [], 0
    bar = tqdm(total=pipe.frame_decoder.num_pixel_frames(stream.start_frame + num_frames), unit="frame",
               desc=job.name[:40], leave=False)
    with bar, Mp4StreamWriter(_path(args, job), fps=cfg.fps) as writer:   # uint8 [T, H, W, 3] frames
        for chunk in source:
            writer.append(chunk.frames[0])
            written += chunk.frames.shape[1]
            bar.update(chunk.frames.shape[1])
            latents.append(chunk.latents.cpu())
    if args.save_latents:
        with AtomicPath(_latents_path(args, job)) as tmp:
            torch.save(torch.cat(latents, 1), tmp)
    seconds = time.perf_counter() - start
    log.info("wrote %s (%d frames, %.1f s, %.1f FPS)", _path(args, job), written, seconds, written / seconds)
    return written, seconds


def timing_line(name: str, chunks: list[StreamChunk], seconds: float) -> str:
    """What the published ``--report_timing`` reports, measured on the stream: the latency of the first frame (from
    the start of generation, after the prompt is encoded, to the frame on the host), the wall time of every block
    (generation and decoding) and the video's frames per second from ``open`` (prompt encoding included) to the
    last frame. The published numbers leave decoding out (it decoded the whole video afterwards); here each block
    is decoded as it is generated, so its time is in."""
    per_block: dict[int, float] = {}
    for chunk in chunks:
        per_block[chunk.block_index] = per_block.get(chunk.block_index, 0.0) + chunk.seconds
    frames = sum(c.frames.shape[1] for c in chunks if c.frames is not None)
    blocks = " ".join(f"{1000 * s:.0f}" for s in per_block.values())
    return (f"[timing] {name}: first frame after {chunks[0].seconds:.3f} s; {frames} frames in {seconds:.2f} s = "
            f"{frames / seconds:.2f} FPS; per block (ms, generation + decoding): {blocks}")


def _report(summary: dict) -> dict:
    n, secs = summary["written"], summary["seconds"]
    per_video = secs / n if n else 0.0
    fps = summary["frames"] / secs if secs else 0.0
    log.info("done: %d videos written, %d skipped, %.2f s per video, %.1f frames per second",
             n, summary["skipped"], per_video, fps)
    summary.update(seconds_per_video=per_video, fps=fps)
    return summary
