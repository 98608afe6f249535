"""Synthetic captioned videos: one captioned shape moving in a direction at a speed, plus uncaptioned distractors.

Grammar (every caption matches exactly)::

    caption   := article " " colour " " shape " moving " direction " " adverb
    article   := "a" | "an"                      (by the colour's first letter)
    colour    := red | green | blue | yellow | purple | orange | cyan | white
    shape     := circle | square | triangle
    direction := left | right | up | down
    adverb    := slowly | quickly               (speed "slow" | "fast")

e.g. ``"a red circle moving left quickly"``. :func:`parse_caption` inverts :func:`format_caption`, so an evaluator
can read the intended attributes back from a prompt.

Rendering: a plain dark background; 0-2 distractor shapes of *other* colours drift in random directions and bounce
off the borders; the captioned shape is drawn last (on top, never occluded) and travels ``SPEED_TRAVEL[speed]`` of
the frame extent along its direction over the clip, staying fully inside the frame. Colours are exact (no
anti-aliasing or noise), so the captioned object is exactly the pixels of its colour. numpy only.
"""

from __future__ import annotations

import itertools
import re
from typing import Sequence

import numpy as np

BACKGROUND = (24, 24, 24)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
# Unit motion (dx, dy) in image coordinates: y grows downwards, so "up" is -y.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEED_ADVERBS = {"slow": "slowly", "fast": "quickly"}
# Fraction of the frame extent (along the motion axis) covered over the whole clip.
SPEED_TRAVEL = {"slow": 0.2, "fast": 0.5}
ATTRIBUTES = ("color", "shape", "direction", "speed")
VOCABULARY = {"color": tuple(COLORS), "shape": SHAPES, "direction": tuple(DIRECTIONS), "speed": tuple(SPEED_ADVERBS)}

_CAPTION_RE = re.compile(
    r"^an? (?P<color>{}) (?P<shape>{}) moving (?P<direction>{}) (?P<adverb>{})$".format(
        "|".join(COLORS), "|".join(SHAPES), "|".join(DIRECTIONS), "|".join(SPEED_ADVERBS.values())))
_SPEED_OF_ADVERB = {adverb: speed for speed, adverb in SPEED_ADVERBS.items()}


def format_caption(attrs: dict) -> str:
    """``{"color", "shape", "direction", "speed"}`` -> caption string."""
    article = "an" if attrs["color"][0] in "aeiou" else "a"
    return f"{article} {attrs['color']} {attrs['shape']} moving {attrs['direction']} {SPEED_ADVERBS[attrs['speed']]}"


def parse_caption(text: str) -> dict:
    """Caption -> ``{"color", "shape", "direction", "speed"}``; case and surrounding/repeated spaces are ignored.

    Raises:
        ValueError: the text does not follow the grammar.
    """
    match = _CAPTION_RE.match(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"caption does not follow the synthetic grammar: {text!r}")
    fields = match.groupdict()
    return {"color": fields["color"], "shape": fields["shape"], "direction": fields["direction"],
            "speed": _SPEED_OF_ADVERB[fields["adverb"]]}


def all_combinations() -> list[dict]:
    """Every attribute combination in a fixed order."""
    return [dict(zip(ATTRIBUTES, values)) for values in itertools.product(*(VOCABULARY[a] for a in ATTRIBUTES))]


def sample_attributes(rng: np.random.Generator, combinations: Sequence[dict] | None = None) -> dict:
    if combinations is not None:
        return dict(combinations[rng.integers(len(combinations))])
    return {a: VOCABULARY[a][rng.integers(len(VOCABULARY[a]))] for a in ATTRIBUTES}


def _shape_masks(shape: str, cx: np.ndarray, cy: np.ndarray, r: float, height: int, width: int) -> np.ndarray:
    """Boolean masks ``[T, H, W]`` of a shape of half-size ``r`` centred at ``(cx[t], cy[t])`` (pixel centres)."""
    yy = np.arange(height, dtype=np.float32)[None, :, None] - cy[:, None, None]
    xx = np.arange(width, dtype=np.float32)[None, None, :] - cx[:, None, None]
    if shape == "circle":
        return xx * xx + yy * yy <= r * r
    if shape == "square":
        side = 0.85 * r  # same area order as the circle
        return (np.abs(xx) <= side) & (np.abs(yy) <= side)
    if shape == "triangle":
        # Upward-pointing isosceles triangle: apex at (0, -r), base from (-r, r) to (r, r).
        return (yy <= r) & (np.abs(xx) <= (yy + r) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def _target_track(attrs: dict, num_frames: int, height: int, width: int, r: float, rng: np.random.Generator):
    """Centre positions ``(cx [T], cy [T])`` of the captioned object; it stays fully inside the frame."""
    dx, dy = DIRECTIONS[attrs["direction"]]
    extent = width if dx else height
    travel = SPEED_TRAVEL[attrs["speed"]] * extent
    lo_x, hi_x, lo_y, hi_y = r, width - 1 - r, r, height - 1 - r
    # Choose the start so that start + travel * direction stays in [lo, hi].
    x0 = rng.uniform(lo_x + max(0, -dx) * travel, hi_x - max(0, dx) * travel)
    y0 = rng.uniform(lo_y + max(0, -dy) * travel, hi_y - max(0, dy) * travel)
    progress = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
    return x0 + dx * travel * progress, y0 + dy * travel * progress


def _bounce(start: float, velocity: float, lo: float, hi: float, num_frames: int) -> np.ndarray:
    """Positions of a point moving at ``velocity`` per frame, reflected at ``lo`` and ``hi``."""
    span = max(hi - lo, 1e-6)
    raw = (start - lo) + velocity * np.arange(num_frames, dtype=np.float32)
    folded = np.mod(raw, 2 * span)
    return lo + np.where(folded > span, 2 * span - folded, folded)


def make_video(caption_attrs: dict, num_frames: int, height: int, width: int, rng: np.random.Generator,
               num_distractors: int | None = None, rgb: tuple[int, int, int] | None = None) -> np.ndarray:
    """Render one clip as uint8 ``[T, H, W, 3]``.

    Args:
        caption_attrs: ``{"color", "shape", "direction", "speed"}`` (see :func:`parse_caption`).
        rng: source of all randomness (start position, size, distractors).
        num_distractors: 0-2 distractors; drawn from ``rng`` when None.
        rgb: the target's colour instead of its palette colour (diagnostics: e.g. the background's, for the same
            clip without its object); the distractors and every random draw stay the same.
    """
    if num_frames < 2 or min(height, width) < 16:
        raise ValueError(f"need at least 2 frames of at least 16x16 pixels, got {num_frames}x{height}x{width}")
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    size = min(height, width)
    if num_distractors is None:
        num_distractors = int(rng.integers(0, 3))
    other_colors = [c for c in COLORS if c != caption_attrs["color"]]
    for color in rng.choice(other_colors, size=num_distractors, replace=False):
        r = size * rng.uniform(0.06, 0.1)
        angle = rng.uniform(0, 2 * np.pi)
        speed = size * rng.uniform(0.0, 0.5) / num_frames
        cx = _bounce(rng.uniform(r, width - 1 - r), speed * np.cos(angle), r, width - 1 - r, num_frames)
        cy = _bounce(rng.uniform(r, height - 1 - r), speed * np.sin(angle), r, height - 1 - r, num_frames)
        video[_shape_masks(SHAPES[rng.integers(len(SHAPES))], cx, cy, r, height, width)] = COLORS[str(color)]
    r = size * rng.uniform(0.1, 0.14)
    cx, cy = _target_track(caption_attrs, num_frames, height, width, r, rng)
    video[_shape_masks(caption_attrs["shape"], cx, cy, r, height, width)] = rgb or COLORS[caption_attrs["color"]]
    return video


def make_dataset(n: int, seed: int, num_frames: int = 33, height: int = 64, width: int = 64,
                 combinations: Sequence[dict] | None = None, first: int = 0) -> list[tuple[str, np.ndarray]]:
    """``n`` pairs ``(caption, uint8 video [T, H, W, 3])``, deterministic given ``seed``: samples ``first`` to
    ``first + n - 1``.

    Sample ``i`` depends only on ``(seed, i)``, so ``make_dataset(10, s)[:5] == make_dataset(5, s)`` and
    ``make_dataset(10, s)[5:] == make_dataset(5, s, first=5)`` (a large set can be rendered in parallel parts).
    ``combinations`` restricts the captions to those attribute combinations (see :func:`make_split`).
    """
    samples = []
    for i in range(first, first + n):
        rng = np.random.default_rng([seed, i])
        attrs = sample_attributes(rng, combinations)
        samples.append((format_caption(attrs), make_video(attrs, num_frames, height, width, rng)))
    return samples


def split_combinations(heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split all attribute combinations into (train, held-out) for compositional evaluation.

    Every single attribute value still occurs in training; only its *combinations* are new at evaluation.
    """
    combos = all_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    target = int(round(heldout_fraction * len(combos)))
    heldout_ids: set[int] = set()
    counts = {(a, c[a]): 0 for c in combos for a in ATTRIBUTES}
    for c in combos:
        for a in ATTRIBUTES:
            counts[(a, c[a])] += 1
    for i in order:
        if len(heldout_ids) == target:
            break
        keys = [(a, combos[i][a]) for a in ATTRIBUTES]
        if all(counts[k] > 1 for k in keys):  # keep at least one training combination per attribute value
            heldout_ids.add(int(i))
            for k in keys:
                counts[k] -= 1
    train = [c for i, c in enumerate(combos) if i not in heldout_ids]
    heldout = [c for i, c in enumerate(combos) if i in heldout_ids]
    return train, heldout


def make_split(n_train: int, n_heldout: int, seed: int, heldout_fraction: float = 0.2,
               **video_kwargs) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """Train and held-out datasets whose captions come from disjoint attribute combinations."""
    train_combos, heldout_combos = split_combinations(heldout_fraction, seed)
    train = make_dataset(n_train, seed, combinations=train_combos, **video_kwargs)
    heldout = make_dataset(n_heldout, seed + 1_000_003, combinations=heldout_combos, **video_kwargs)
    return train, heldout
