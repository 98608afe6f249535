"""Pictures of the shipped toy models for the docs: a frame strip per model (PNG) and an animated preview (GIF).

    python -m toy.pictures              # docs/images/toy_{chunkwise,framewise}.png and toy_preview.gif, ~2 min (CPU)

Every video is one that ``inference.py --data_path prompts/toy.txt`` writes, with its seed (``app.jobs.video_seed``):
a strip shows, for each prompt of prompts/toy.txt, every 4th of the 33 frames of the first of the 4 videos
docs/toy_results.md scores (``--num_samples 4``); the preview shows the 8 videos of README's command (one a prompt).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from app.jobs import video_seed
from pipeline.streaming import StreamingPipeline
from utils.paths import REPO_ROOT

MODELS = {"chunkwise": "toy/causal_forcing_dmd_chunkwise", "framewise": "toy/causal_forcing_dmd_framewise"}
STRIP_SAMPLES = 4       # the strips show the videos docs/toy_results.md scores: --num_samples 4, sample 0
FRAME_STEP = 4          # one frame in 4: a latent frame's worth of motion between columns
LABEL_WIDTH = 230       # pixels for the prompt left of each row
GAP = 2                 # white pixels between frames and between rows
PREVIEW_COLUMNS = 4     # the GIF's grid of videos, at their own size (README shows it twice as large): the noise of
PREVIEW_COLORS = 64     # the dark backgrounds compresses badly, so a 2x GIF would be ~0.6 MB


def videos(name: str, prompts: list[str], num_samples: int) -> tuple[np.ndarray, int]:
    """(uint8 ``[P, T, H, W, 3]``, fps): sample 0 of each prompt from the shipped model, as ``inference.py
    --num_samples <num_samples>`` makes it."""
    pipe = StreamingPipeline.from_pretrained(MODELS[name], device="cpu")
    frames = [pipe.generate(prompt, seed=video_seed(0, i, 0, num_samples)).frames[0]
              for i, prompt in enumerate(prompts)]
    return np.stack(frames), pipe.fps


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "images"), help="folder of the pictures")
    p.add_argument("--data_path", default=str(REPO_ROOT / "prompts" / "toy.txt"), help="prompts, one per line")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [line.strip() for line in Path(args.data_path).read_text().splitlines() if line.strip()]
    for name in MODELS:
        strip(videos(name, prompts, STRIP_SAMPLES)[0], prompts).quantize(128).save(out / f"toy_{name}.png",
                                                                                  optimize=True)
        print(f"wrote {out / f'toy_{name}.png'}")
    frames, fps = videos("chunkwise", prompts, 1)
    gif = preview(frames)
    gif[0].save(out / "toy_preview.gif", save_all=True, append_images=gif[1:], loop=0, optimize=True,
                duration=round(1000 / fps))
    print(f"wrote {out / 'toy_preview.gif'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
