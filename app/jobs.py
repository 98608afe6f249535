"""The work behind ``inference.py``: prompts -> jobs -> streamed mp4 files, with a summary.

Kept out of the entry script so it can be tested and reused (the toy recipe names its videos and seeds the same way).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from app.cli import config_from_args, pipeline_from_args
from pipeline.streaming import StreamingPipeline
from utils.datasets import TextDataset
from utils.errors import DataError, UserError, ensure_folder
from utils.io import atomic_path, remove_stale_temps
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
        prompts, texts, images = _read_i2v(args.data_path)
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


def _read_i2v(path: str):
    """I2V prompt file: lines ``image_path<TAB>prompt`` (relative image paths are relative to the file)."""
    if not os.path.isfile(path):
        raise DataError(f"I2V prompt file not found: {path} (expected lines 'image_path<TAB>prompt')")
    prompts, images = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise DataError(f"{path}:{n}: expected 'image_path<TAB>prompt'")
            image, prompt = line.rstrip("\n").split("\t", 1)
            image = image if os.path.isabs(image) else os.path.join(os.path.dirname(path), image)
            if not os.path.isfile(image):
                raise DataError(f"{path}:{n}: image not found: {image}")
            images.append(image)
            prompts.append(prompt.strip())
    if not prompts:
        raise DataError(f"I2V prompt file is empty: {path}")
    return prompts, prompts, images


def load_image_latent(pipe: StreamingPipeline, path: str, height: int, width: int) -> torch.Tensor:
    """An image resized to the video size -> its VAE latent ``[1, 1, C, h, w]``."""
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(img)).float().div(127.5).sub(1)            # [H, W, 3] in [-1, 1]
    pixels = pixels.permute(2, 0, 1)[None, :, None].to(pipe.device, pipe.vae.dtype)  # [1, 3, 1, H, W]
    with torch.no_grad():
        return pipe.vae.encode(pixels).to(pipe.dtype)


def run_inference(args) -> dict:
    """Generate every job of this rank; returns (and logs) the summary."""
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
    for job in todo:
        frames, seconds = _generate(pipe, cfg, args, job, num_frames)
        summary["written"] += 1
        summary["seconds"] += seconds
        summary["frames"] += frames
    return _report(summary)


def _path(args, job: Job) -> str:
    return os.path.join(args.output_folder, job.name + ".mp4")


def _latents_path(args, job: Job) -> str:
    return os.path.join(args.output_folder, job.name + ".latents.pt")


def _generate(pipe: StreamingPipeline, cfg, args, job: Job, num_frames: int) -> tuple[int, float]:
    """One video, written block by block; returns (pixel frames, seconds)."""
    start = time.perf_counter()
    initial = None
    if job.image is not None:
        initial = load_image_latent(pipe, job.image, cfg.height, cfg.width)
        num_frames -= 1
    stream = pipe.open(job.prompt, num_frames, seed=job.seed, initial_latent=initial, uint8=True)
    latents, written = [], 0
    bar = tqdm(total=pipe.frame_decoder.num_pixel_frames(stream.start_frame + num_frames), unit="frame",
               desc=job.name[:40], leave=False)
    with bar, Mp4StreamWriter(_path(args, job), fps=cfg.fps) as writer:   # uint8 [T, H, W, 3] frames
        for chunk in stream:
            writer.append(chunk.frames[0])
            written += chunk.frames.shape[1]
            bar.update(chunk.frames.shape[1])
            latents.append(chunk.latents.cpu())
    if args.save_latents:
        with atomic_path(_latents_path(args, job)) as tmp:
            torch.save(torch.cat(latents, 1), tmp)
    seconds = time.perf_counter() - start
    log.info("wrote %s (%d frames, %.1f s, %.1f FPS)", _path(args, job), written, seconds, written / seconds)
    return written, seconds


def _report(summary: dict) -> dict:
    n, secs = summary["written"], summary["seconds"]
    per_video = secs / n if n else 0.0
    fps = summary["frames"] / secs if secs else 0.0
    log.info("done: %d videos written, %d skipped, %.2f s per video, %.1f frames per second",
             n, summary["skipped"], per_video, fps)
    summary.update(seconds_per_video=per_video, fps=fps)
    return summary
