"""Pictures of the toy models for docs/toy_results.md and README: a frame strip (PNG) per row of the results tables
and an animated preview (GIF).

    python -m toy.pictures                              # a few minutes on a CPU: the models in assets/toy
    python -m toy.pictures --workdir build/toyfull      # + every row of a toy.recipe run, from its videos

``toy_ground_truth.png`` shows each prompt as the toy world renders it (what the models are asked to draw). A model's
strip shows, for each prompt of prompts/toy.txt, every 4th of the 33 frames of the first of the videos the table scores
(``--num_samples 4``: sample 0, with its seed ``app.jobs.video_seed``). Without ``--workdir`` they are made here from
the shipped models: the two Causal Forcing DMD generators (``toy_chunkwise.png``, ``toy_framewise.png``, the
shipped-models table and the recipe table's DMD rows) and the bidirectional base (``toy_base_50.png``, its ``base_50``
row); the preview shows the 8 videos of README's command (one a prompt). With ``--workdir`` every recipe row whose
videos are under ``<workdir>/samples/<row>/`` gets ``toy_<row>.png`` from those very files; with ``--device`` too, a row
that has a model there but no videos (a run without ffmpeg) is sampled for its strip.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from app.jobs import video_seed
from pipeline.streaming import StreamingPipeline
from utils.paths import REPO_ROOT
from utils.video import read_mp4, safe_output_name, to_uint8_frames

MODELS = {"chunkwise": "toy/causal_forcing_dmd_chunkwise", "framewise": "toy/causal_forcing_dmd_framewise"}
STRIP_SAMPLES = 4       # the strips show the videos docs/toy_results.md scores: --num_samples 4, sample 0
FRAME_STEP = 4          # one frame in 4: a latent frame's worth of motion between columns
LABEL_WIDTH = 230       # pixels for the prompt left of each row
GAP = 2                 # white pixels between frames and between rows
STRIP_COLORS = 128      # palette of the PNGs: a third of the size of true colour, no visible loss at 64x64
PREVIEW_COLUMNS = 4     # the GIF's grid of videos, at their own size (README shows it twice as large): the noise of
PREVIEW_COLORS = 64     # the dark backgrounds compresses badly, so a 2x GIF would be ~0.6 MB


def shipped_videos(name: str, prompts: list[str], num_samples: int) -> tuple[np.ndarray, int]:
    """(uint8 ``[P, T, H, W, 3]``, fps): sample 0 of each prompt from a shipped DMD model, as ``inference.py
    --num_samples <num_samples>`` makes it."""
    pipe = StreamingPipeline.from_pretrained(MODELS[name], device="cpu")
    frames = [pipe.generate(prompt, seed=video_seed(0, i, 0, num_samples)).frames[0]
              for i, prompt in enumerate(prompts)]
    return np.stack(frames), pipe.fps


def base_videos(prompts: list[str], num_samples: int) -> np.ndarray:
    """uint8 ``[P, T, H, W, 3]``: sample 0 of each prompt from the shipped base, as the recipe's ``base_50`` row
    samples it (50 steps, CFG)."""
    from toy.recipe import CONFIGS, BaseSampler
    from utils.config import load_config

    sample = BaseSampler(load_config(CONFIGS / "base.yaml"), "cpu")
    return np.stack([to_uint8_frames(sample(prompt, video_seed(0, i, 0, num_samples)), (-1, 1), "TCHW")
                     for i, prompt in enumerate(prompts)])


def ground_truth_videos(prompts: list[str], seed: int = 0) -> np.ndarray:
    """uint8 ``[P, T, H, W, 3]``: each prompt rendered by the toy world (``toy.world.make_video``, the clip geometry of
    configs/toy), what the models are asked to draw; prompt ``i`` from ``default_rng([seed, i])``."""
    from toy.recipe import CONFIGS
    from toy.world import make_video, parse_caption
    from utils.config import load_config

    cfg = load_config(CONFIGS / "base.yaml")
    return np.stack([make_video(parse_caption(prompt), cfg.num_frames, cfg.height, cfg.width,
                                np.random.default_rng([seed, i])) for i, prompt in enumerate(prompts)])


def folder_videos(folder: Path, prompts: list[str]) -> np.ndarray | None:
    """uint8 ``[P, T, H, W, 3]``: sample 0 of each prompt from a folder inference.py wrote (``<name>-0.mp4``, or
    ``<name>.mp4`` with one sample a prompt); None when a prompt has no video there."""
    used: set[str] = set()
    frames = []
    for prompt in prompts:
        stem = safe_output_name(prompt, used=used)
        path = next((p for p in (folder / f"{stem}-0.mp4", folder / f"{stem}.mp4") if p.is_file()), None)
        if path is None:
            return None
        frames.append(read_mp4(path))
    return np.stack(frames)


def strip(frames: np.ndarray, prompts: list[str]) -> Image.Image:
    """One row per video: its prompt, then every FRAME_STEP-th frame."""
    picked = frames[:, ::FRAME_STEP]                             # [P, t, H, W, 3]
    p, t, h, w, _ = picked.shape
    image = Image.new("RGB", (LABEL_WIDTH + t * (w + GAP), p * (h + GAP)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    for row in range(p):
        y = row * (h + GAP)
        draw.text((4, y + h // 2), prompts[row], fill="black", anchor="lm", font=font)
        for col in range(t):
            image.paste(Image.fromarray(picked[row, col]), (LABEL_WIDTH + col * (w + GAP), y))
    return image


def preview(frames: np.ndarray) -> list[Image.Image]:
    """The videos side by side in a grid, one GIF frame per video frame."""
    p, t, h, w, _ = frames.shape
    rows = -(-p // PREVIEW_COLUMNS)
    grid = np.zeros((t, rows * h, PREVIEW_COLUMNS * w, 3), np.uint8)
    for i in range(p):
        r, c = divmod(i, PREVIEW_COLUMNS)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = frames[i]
    return [Image.fromarray(frame).quantize(PREVIEW_COLORS) for frame in grid]


def save_strip(frames: np.ndarray, prompts: list[str], path: Path) -> None:
    strip(frames, prompts).quantize(STRIP_COLORS).save(path, optimize=True)
    print(f"wrote {path}")


def recipe_strips(workdir: Path, prompts: list[str], out: Path, device: str | None = None) -> int:
    """``toy_<row>.png`` for every results-table row with videos under ``<workdir>/samples/<row>/``, or else, with
    ``device``, with a model in the workdir: its videos of the prompts sampled here (one batch, seed 0; no ffmpeg
    needed). A strip newer than its videos or model is kept, so a second call after a time limit draws the rest.
    Returns how many rows have a strip."""
    import torch

    from toy.diagnose import available_rows, sample_row
    from toy.recipe import table_rows

    models = {row.name: (row, ckpt, base) for row, ckpt, base in available_rows(workdir)} if device else {}
    count = 0
    for row in table_rows():
        target, folder = out / f"toy_{row.name}.png", workdir / "samples" / row.name
        source = folder if folder.is_dir() else None
        if source is None and row.name in models:
            _, checkpoint, base = models[row.name]
            source = Path(checkpoint or base)
        if source is not None and target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            print(f"{target} is newer than {source}: kept")
            count += 1
            continue
        frames = folder_videos(folder, prompts)
        if frames is None and row.name in models:
            frames = np.stack(sample_row(*models[row.name], prompts, 0, len(prompts), torch.device(device)))
        if frames is None:
            print(f"no videos of {row.name} in {workdir / 'samples' / row.name}" + (" and no model" if device else ""))
            continue
        save_strip(frames, prompts, target)
        count += 1
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "images"), help="folder of the pictures")
    p.add_argument("--data_path", default=str(REPO_ROOT / "prompts" / "toy.txt"), help="prompts, one per line")
    p.add_argument("--workdir", help="a toy.recipe --workdir: strips of every table row from its sample videos "
                                     "(instead of the shipped models)")
    p.add_argument("--device", default=None,
                   help="with --workdir: sample the rows that have a model but no videos there on this device "
                        "(cpu, cuda)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [line.strip() for line in Path(args.data_path).read_text().splitlines() if line.strip()]
    save_strip(ground_truth_videos(prompts), prompts, out / "toy_ground_truth.png")
    if args.workdir:
        return 0 if recipe_strips(Path(args.workdir), prompts, out, args.device) else 1
    for name in MODELS:
        save_strip(shipped_videos(name, prompts, STRIP_SAMPLES)[0], prompts, out / f"toy_{name}.png")
    save_strip(base_videos(prompts, STRIP_SAMPLES), prompts, out / "toy_base_50.png")
    frames, fps = shipped_videos("chunkwise", prompts, 1)
    gif = preview(frames)
    gif[0].save(out / "toy_preview.gif", save_all=True, append_images=gif[1:], loop=0, optimize=True,
                duration=round(1000 / fps))
    print(f"wrote {out / 'toy_preview.gif'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
