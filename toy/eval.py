"""Toy-world evaluation: does a generated clip show what its synthetic caption asks for? (numpy only)

Detector (per clip, given the prompt's attributes from :func:`toy.world.parse_caption`):

1. Colour mask: each palette colour spans the blend segment from the background to it (what blur makes of an object
   edge); a pixel belongs to the captioned colour when that colour's segment is the nearest, the pixel is at least
   half-way along it, and within ``max_color_distance`` RGB units of it (see :func:`color_mask`). The half-way rule
   puts a blurred edge where the sharp one was, so areas and centroids survive VAE blur.
2. Per frame, the largest 4-connected blob of the mask (at least ``min_area_fraction`` of the frame) is the object:
   its centroid, area, bounding box.
3. Shape, from per-frame cues averaged over the clip (the synthetic shapes are axis-aligned, triangles point up):
   triangle when the centroid sits below the bounding-box centre by at least ``triangle_offset`` of the box height
   (a sharp triangle: 1/6, circle and square: 0; blur cuts the apex but keeps it positive); else circle when the
   blob's IoU with the ellipse inscribed in its box beats its IoU with the box itself (the fill ratio: circle
   ~0.785, square ~1, triangle ~0.5), else square. On ground-truth 64x64 clips with Gaussian blur of sigma pixels
   plus noise, shape accuracy was 1.0 up to sigma 1.5, 0.94 at 2 and 0.75 at 2.5 (48 clips): heavy blur makes
   squares round.
4. Direction: sign and axis of the net displacement of a straight line fitted to the centroid track; speed: that
   displacement as a fraction of the frame extent along the axis, compared with ``SPEED_TRAVEL`` (thresholds half-way
   between the classes; below half the slowest travel the object counts as static and matches no direction/speed).

Scores per clip: colour present (object found in at least ``min_presence`` of the frames), shape / direction / speed
correct (0 when the colour is absent), faithfulness = their mean. Chance levels are in :data:`CHANCE`. Also a motion
score (mean per-frame centroid step and mean absolute frame difference), a temporal-consistency score (area
stability), and a set-level distance to real clips over simple per-clip features (Fréchet distance and
nearest-neighbour distance); the reference set is the held-out split of :func:`toy.world.make_split`
(see :func:`reference_clips`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from toy.world import BACKGROUND, COLORS, DIRECTIONS, SHAPES, SPEED_TRAVEL, make_split, parse_caption

logger = logging.getLogger(__name__)

SCORES = ("color", "shape", "direction", "speed")
# Chance of each score for a guesser: a clip with one object of a uniformly random colour (distractors raise the colour
# level), a random shape, a random one of the four directions, a random one of the two speeds.
CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "direction": 1 / len(DIRECTIONS),
          "speed": 1 / len(SPEED_TRAVEL)}
CHANCE["faithfulness"] = float(np.mean([CHANCE[k] for k in SCORES]))
# Per-clip diagnostics of :func:`track_diagnostics`, averaged over clips in the aggregate.
DIAGNOSTICS = ("frame0_present", "frame0_area_ratio", "jitter_px", "presence_early", "presence_late",
               "color_error_early", "color_error_late")
_LUT_STEP = 8  # colour classification is tabulated on 8-level RGB cells (see _membership_table)
_LUT_LEVELS = 256 // _LUT_STEP


@dataclass
class DetectorSettings:
    """Thresholds of the detector (defaults suit 64x64 toy clips and VAE-blurred generations)."""

    max_color_distance: float = 110.0  # RGB units; the closest two palette colours (yellow/orange) are ~80 apart
    min_area_fraction: float = 0.006   # smallest blob kept, as a fraction of the frame (toy objects are >= 0.02)
    min_presence: float = 0.5          # fraction of frames that must show the object for "colour present"
    max_side: int = 128                # larger frames are box-downsampled first (the detector is O(H W) per pass)
    triangle_offset: float = 0.04      # centroid below the box centre by this fraction of its height -> triangle


@dataclass
class ObjectTrack:
    """The detected object per frame (``T`` frames); entries of absent frames are NaN (area 0)."""

    present: np.ndarray    # [T] bool
    area: np.ndarray       # [T] pixels
    cx: np.ndarray         # [T] centroid x (pixels)
    cy: np.ndarray         # [T] centroid y (pixels)
    fill: np.ndarray       # [T] blob area / bounding-box area
    offset: np.ndarray     # [T] (centroid y - box centre y) / box height; > 0: mass sits low, as in a triangle
    ellipse_iou: np.ndarray  # [T] IoU of the blob with the ellipse inscribed in its bounding box
    height: int
    width: int
    rgb: np.ndarray | None = None  # [T, 3] median colour of the blob (NaN where absent)


# ---------------------------------------------------------------------------------------------------------------------
# 1-2. Colour mask and the largest blob per frame


def _downsample(video: np.ndarray, max_side: int) -> np.ndarray:
    """Box-downsample ``[T, H, W, 3]`` by an integer factor so that the shorter side is at most ``max_side``
    (float32 result; a small enough clip is returned as it is)."""
    factor = -(-min(video.shape[1:3]) // max_side)
    if factor <= 1:
        return video
    t, h, w, c = video.shape
    h, w = h // factor * factor, w // factor * factor
    v = video[:, :h, :w].astype(np.float32).reshape(t, h // factor, factor, w // factor, factor, c)
    return v.mean(axis=(2, 4))


def _blend_membership(rgb: np.ndarray, color: str, max_distance: float) -> np.ndarray:
    """Float colours ``[..., 3]`` (0..255) -> bool ``[...]``: the :func:`color_mask` rule for each colour."""
    bg = np.asarray(BACKGROUND, np.float32)
    seg = np.asarray([COLORS[c] for c in COLORS], np.float32) - bg  # [K, 3]
    p = rgb - bg
    proj = p @ seg.T                                                 # [..., K]
    alpha = np.clip(proj / (seg ** 2).sum(axis=1), 0.0, 1.0)
    # |p - a s|^2 = |p|^2 - 2 a p.s + a^2 |s|^2
    dist2 = (p ** 2).sum(axis=-1, keepdims=True) - 2 * alpha * proj + alpha ** 2 * (seg ** 2).sum(axis=1)
    k = list(COLORS).index(color)
    return (dist2.argmin(axis=-1) == k) & (alpha[..., k] >= 0.5) & (dist2[..., k] <= max_distance ** 2)


@functools.lru_cache(maxsize=64)
def _membership_table(color: str, max_distance: float) -> np.ndarray:
    """Bool ``[32, 32, 32]``: the rule evaluated once at the centres of 8-level RGB cells (a cell is at most ~7 RGB
    units across, small next to the ~80 between the closest palette colours); pixels are then looked up."""
    centres = np.arange(_LUT_LEVELS, dtype=np.float32) * _LUT_STEP + (_LUT_STEP - 1) / 2
    grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1)  # [32, 32, 32, 3]
    return _blend_membership(grid, color, max_distance)


def color_mask(frames: np.ndarray, color: str, max_distance: float) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` (0..255, uint8 or float) -> bool ``[T, H, W]``: pixels of the ``color`` object.

    Each palette colour ``c`` spans the blend segment ``bg + a (c - bg)``, ``a`` in [0, 1] (what blur makes of an
    object edge over the background). A pixel goes to the colour whose segment is nearest and counts as object when
    that colour is ``color``, its blend weight ``a`` is at least 1/2 (the edge lies half-way) and the segment is within
    ``max_distance``. Plain nearest-colour assignment would hand blurred edges to palette colours that lie between
    the object and the background (grey edges of white to purple, dark orange to red) and eat the shape's corners.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = np.clip(frames, 0, 255).astype(np.uint8)
    q = frames // _LUT_STEP
    return _membership_table(color, float(max_distance))[q[..., 0], q[..., 1], q[..., 2]]


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of each frame of a bool ``[T, H, W]`` mask.

    Returns int64 ``[T, H, W]``: -1 off the mask, else the flat index of one pixel of the component (so labels are
    unique across frames). Min-label propagation with pointer jumping; each label always names a pixel of its own
    component, which is what makes the jump ``lab[lab]`` valid and convergence fast (a few passes per blob).
    """
    big = mask.size
    lab = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        new = lab.copy()
        # Neighbours along H and W only: components never cross frames.
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], lab[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], lab[:, :, 1:], out=new[:, :, :-1])
        new = np.where(mask, new, big)
        flat = new.reshape(-1)
        on = flat < big
        flat[on] = flat[flat[on]]  # pointer jump: adopt the label of the pixel my label names
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, -1)


def largest_blobs(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Bool ``[T, H, W]``: per frame, the largest component of ``mask`` if it has at least ``min_area`` pixels."""
    lab = label_components(mask)
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    frame_size = mask.shape[1] * mask.shape[2]
    chosen = np.full(mask.shape[0], -2, dtype=np.int64)  # -2 matches no pixel
    frames = ids // frame_size
    order = np.lexsort((counts, frames))  # by frame, then area: the last entry of a frame is its largest
    last = order[np.append(frames[order][1:] != frames[order][:-1], True)] if len(order) else order
    last = last[counts[last] >= min_area]
    chosen[frames[last]] = ids[last]
    return lab == chosen[:, None, None]


# ---------------------------------------------------------------------------------------------------------------------
# 3. Per-frame geometry and shape templates


def _frame_geometry(blob: np.ndarray) -> np.ndarray:
    """One frame's blob ``[H, W]`` -> [area, cx, cy, fill ratio, vertical centroid offset, ellipse IoU]."""
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box_h, box_w = y1 - y0 + 1, x1 - x0 + 1
    cy = ys.mean()
    # Ellipse inscribed in the box, sampled at pixel centres: ((x - xc) / a)^2 + ((y - yc) / b)^2 <= 1.
    v = (np.arange(box_h) + 0.5) / box_h * 2 - 1
    u = (np.arange(box_w) + 0.5) / box_w * 2 - 1
    ellipse = u[None, :] ** 2 + v[:, None] ** 2 <= 1.0
    crop = blob[y0:y1 + 1, x0:x1 + 1]
    iou = (ellipse & crop).sum() / (ellipse | crop).sum()
    return np.array([len(xs), xs.mean(), cy, len(xs) / (box_h * box_w), (cy - (y0 + y1) / 2) / box_h, iou])


def detect_object(video: np.ndarray, color: str, settings: DetectorSettings | None = None) -> ObjectTrack:
    """Find the object of ``color`` in uint8 ``[T, H, W, 3]``; see the module docstring for the rules."""
    settings = settings or DetectorSettings()
    if video.ndim != 4 or video.shape[-1] != 3 or len(video) < 2:
        raise ValueError(f"expected a clip [T>=2, H, W, 3], got shape {video.shape}")
    frames = _downsample(video, settings.max_side)
    t, h, w, _ = frames.shape
    blobs = largest_blobs(color_mask(frames, color, settings.max_color_distance),
                          settings.min_area_fraction * h * w)
    present = blobs.any(axis=(1, 2))
    geometry = np.full((t, 6), np.nan)  # area, cx, cy, fill, offset, ellipse IoU per frame
    geometry[:, 0] = 0.0
    rgb = np.full((t, 3), np.nan)
    for i in np.nonzero(present)[0]:
        geometry[i] = _frame_geometry(blobs[i])
        rgb[i] = np.median(frames[i][blobs[i]], axis=0)   # median: the blurred rim does not pull it to the background
    return ObjectTrack(present, *geometry.T, height=h, width=w, rgb=rgb)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Attributes and scores of one clip


def _speed_thresholds() -> tuple[float, list[tuple[float, str]]]:
    """(static threshold, [(lower bound, speed name)] ascending) from ``SPEED_TRAVEL``: half-way between classes."""
    ordered = sorted(SPEED_TRAVEL.items(), key=lambda kv: kv[1])
    bounds = [(0.5 * ordered[0][1], ordered[0][0])]
    bounds += [((a[1] + b[1]) / 2, b[0]) for a, b in zip(ordered, ordered[1:])]
    return bounds[0][0], bounds


def track_displacement(track: ObjectTrack) -> tuple[float, float]:
    """Net (dx, dy) over the clip in pixels: slope of a least-squares line through the present centroids x (T-1)."""
    idx = np.nonzero(track.present)[0]
    if len(idx) < 2:
        return 0.0, 0.0
    t = idx.astype(np.float64)
    tc = t - t.mean()
    denom = (tc ** 2).sum()
    span = len(track.present) - 1
    return (float((tc * track.cx[idx]).sum() / denom * span), float((tc * track.cy[idx]).sum() / denom * span))


def classify_track(track: ObjectTrack, settings: DetectorSettings | None = None) -> dict:
    """Detected attributes: presence fraction, shape, direction, travel (fraction of the extent) and speed.

    ``shape``/``direction``/``speed`` are None when the object is absent; ``direction``/``speed`` are "static" when
    it travels less than half the slowest captioned travel. The shape cues (mean ``fill_ratio``, ``offset``,
    ``ellipse_iou`` over present frames) are returned too; the rule is in the module docstring.
    """
    settings = settings or DetectorSettings()
    out = {"presence": float(track.present.mean()), "shape": None, "direction": None, "speed": None,
           "travel": 0.0, "fill_ratio": None, "offset": None, "ellipse_iou": None}
    if not track.present.any():
        return out
    for key in ("fill", "offset", "ellipse_iou"):
        out["fill_ratio" if key == "fill" else key] = float(np.nanmean(getattr(track, key)))
    if out["offset"] >= settings.triangle_offset:
        out["shape"] = "triangle"
    else:  # the box's own IoU with the blob is the fill ratio
        out["shape"] = "circle" if out["ellipse_iou"] > out["fill_ratio"] else "square"
    dx, dy = track_displacement(track)
    horizontal = abs(dx) / track.width >= abs(dy) / track.height
    travel = abs(dx) / track.width if horizontal else abs(dy) / track.height
    static, bounds = _speed_thresholds()
    out["travel"] = float(travel)
    if travel < static:
        out["direction"] = out["speed"] = "static"
        return out
    out["direction"] = ("right" if dx > 0 else "left") if horizontal else ("down" if dy > 0 else "up")
    out["speed"] = [name for low, name in bounds if travel >= low][-1]
    return out


def motion_scores(video: np.ndarray, track: ObjectTrack) -> dict:
    """Motion and temporal consistency of one clip.

    * ``centroid_step``: mean per-frame centroid displacement over consecutive present frames, as a fraction of the
      shorter frame side (0 for a static object or no object);
    * ``frame_diff``: mean absolute difference of consecutive frames, 0..1 (pixel noise and flicker count too: a
      ground-truth clip gives ~0.003, the same clip with noise of std 10 ~0.045);
    * ``area_cv``: coefficient of variation of the object's area over present frames; ``area_stability`` =
      max(0, 1 - area_cv) (1 = the object keeps its size; None without an object).
    """
    both = track.present[1:] & track.present[:-1]
    steps = np.hypot(np.diff(track.cx), np.diff(track.cy))[both]
    step = float(steps.mean() / min(track.height, track.width)) if len(steps) else 0.0
    diff = float(np.abs(np.diff(video.astype(np.int16), axis=0)).mean() / 255.0)
    areas = track.area[track.present]
    cv = float(areas.std() / areas.mean()) if len(areas) else None
    return {"centroid_step": step, "frame_diff": diff, "area_cv": cv,
            "area_stability": None if cv is None else max(0.0, 1.0 - cv)}


def track_diagnostics(track: ObjectTrack, color: str) -> dict:
    """What goes wrong along one clip (issue 27): the first frame, wobble and colour drift.

    * ``frame0_present``: the object is found in frame 0; ``frame0_area_ratio``: its area there over the median area
      of the later frames where it is found (1 for a rigid object; None when either is missing);
    * ``jitter_px``: RMS distance in pixels of the present centroids from the straight line fitted through them
      (ground-truth clips: ~0.1 px, rasterisation only);
    * ``presence_early`` / ``presence_late``: fraction of the first / last third of the frames that show the object;
    * ``color_error_early`` / ``color_error_late``: mean RGB distance of the blob's median colour to the palette
      colour over the present frames of the first / last third (a drift to another colour also lowers the late
      presence, since the mask no longer finds it).
    """
    t = len(track.present)
    idx = np.nonzero(track.present)[0]
    out = {"frame0_present": bool(track.present[0]), "frame0_area_ratio": None, "jitter_px": None}
    later = track.area[1:][track.present[1:]]
    if track.present[0] and len(later):
        out["frame0_area_ratio"] = float(track.area[0] / np.median(later))
    if len(idx) >= 3:
        resid = [np.polyval(np.polyfit(idx, c[idx], 1), idx) - c[idx] for c in (track.cx, track.cy)]
        out["jitter_px"] = float(np.sqrt(np.mean(resid[0] ** 2 + resid[1] ** 2)))
    third = max(1, t // 3)
    error = np.linalg.norm(track.rgb - np.asarray(COLORS[color], np.float64), axis=-1) if track.rgb is not None \
        else np.full(t, np.nan)
    for name, part in (("early", slice(0, third)), ("late", slice(t - third, t))):
        out[f"presence_{name}"] = float(track.present[part].mean())
        seen = error[part][track.present[part]]
        out[f"color_error_{name}"] = float(seen.mean()) if len(seen) else None
    return out


def frame_color(frame: np.ndarray, settings: DetectorSettings | None = None) -> str | None:
    """The palette colour of the largest object in one frame ``[H, W, 3]`` (each colour's largest blob by the
    detector's rules), or None where no colour has a blob of the minimum area. Tells a frame 0 that misses the
    prompt's object apart: an object of another colour there, or none."""
    settings = settings or DetectorSettings()
    frames = _downsample(np.asarray(frame)[None], settings.max_side)
    min_area = settings.min_area_fraction * frames.shape[1] * frames.shape[2]
    areas = {c: int(largest_blobs(color_mask(frames, c, settings.max_color_distance), min_area).sum())
             for c in COLORS}
    best = max(areas, key=areas.get)
    return best if areas[best] > 0 else None


def score_video(video: np.ndarray, prompt: str, settings: DetectorSettings | None = None) -> dict:
    """Scores of one clip (uint8 ``[T, H, W, 3]``) against its caption.

    Returns a JSON-ready dict: ``prompt``, ``target`` (parsed attributes), ``detected`` (see :func:`classify_track`),
    0/1 scores ``color``/``shape``/``direction``/``speed``, ``faithfulness`` (their mean), the motion scores,
    ``features`` (for :func:`frechet_distance`) and ``seconds``.

    Raises:
        ValueError: the prompt does not follow the synthetic grammar, or the clip has a wrong shape or dtype.
    """
    start = time.perf_counter()
    settings = settings or DetectorSettings()
    target = parse_caption(prompt)
    video = np.asarray(video)
    if video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 clip, got {video.dtype} (see utils.video.to_uint8_frames)")
    track = detect_object(video, target["color"], settings)
    detected = classify_track(track, settings)
    present = detected["presence"] >= settings.min_presence
    scores = {"color": float(present)}
    for key in ("shape", "direction", "speed"):
        scores[key] = float(present and detected[key] == target[key])
    scores["faithfulness"] = float(np.mean([scores[k] for k in SCORES]))
    motion = motion_scores(video, track)
    features = video_features(video, track, detected, motion)
    diagnostics = track_diagnostics(track, target["color"])
    diagnostics["frame0_color"] = target["color"] if diagnostics["frame0_present"] else frame_color(video[0], settings)
    return {"prompt": prompt, "target": target, "detected": detected, **scores, **motion,
            **diagnostics, "features": features.tolist(),
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------------
# 5. Set-level distance to real clips


def color_histogram(video: np.ndarray, bins: int = 4) -> np.ndarray:
    """Square root of the uint8 clip's RGB histogram (``bins`` per channel, fractions summing to 1) ``[bins**3]``.

    The square root (Hellinger embedding) keeps the small object bins visible next to the large background bin.
    """
    q = np.minimum(np.asarray(video, np.uint8) // (256 // bins), bins - 1).astype(np.intp)
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    hist = np.bincount(codes.reshape(-1), minlength=bins ** 3) / codes.size
    return np.sqrt(hist)


def video_features(video: np.ndarray, track: ObjectTrack, detected: dict, motion: dict,
                   motion_weight: float = 2.0) -> np.ndarray:
    """Per-clip feature vector: colour histogram (64) + object/motion features (9), all of order 0..1.

    The object/motion block is weighted by ``motion_weight`` so that motion counts about as much as colour in a
    Euclidean distance (the histogram block has unit norm).
    """
    dx, dy = track_displacement(track)
    track_part = np.array([
        detected["presence"],
        np.sqrt(track.area[track.present].mean() / (track.height * track.width)) if track.present.any() else 0.0,
        motion["area_cv"] or 0.0,
        detected["fill_ratio"] or 0.0,
        dx / track.width, dy / track.height, detected["travel"],
        motion["centroid_step"] * (len(video) - 1),  # path length as a fraction of the frame side
        np.sqrt(motion["frame_diff"]),
    ]) * motion_weight
    return np.concatenate([color_histogram(video), track_part]).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]`` (N, M >= 2).

    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``, in float64 with symmetric eigen-decompositions
    (small sets give singular covariances; the symmetric form stays real and non-negative there).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_a @ cb @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross
    return float(max(value, 0.0))


def nearest_neighbour_distance(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> float:
    """Mean over rows of ``a [N, D]`` of the Euclidean distance to the nearest row of ``b [M, D]``.

    ``exclude_self``: ``a`` is ``b`` and each row's own zero distance is skipped (leave-one-out spread of a set).
    """
    d = np.linalg.norm(np.asarray(a)[:, None, :] - np.asarray(b)[None, :, :], axis=-1)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).mean())


def reference_clips(num: int, seed: int, num_frames: int = 33, height: int = 64, width: int = 64) -> list:
    """The real reference set: the first ``num`` clips of the held-out split of ``make_split(..., seed)``.

    Sample ``i`` of a synthetic set depends only on ``(seed, i)``, so these are exactly the first ``num`` held-out
    clips of any ``make_split(n_train, n_heldout >= num, seed)`` (held-out attribute combinations, never trained on).
    """
    return make_split(0, num, seed, num_frames=num_frames, height=height, width=width)[1]


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(values)) if values else None


def _prompt_means(rows: list[dict], key: str) -> dict[str, tuple[float, int]]:
    """``{prompt: (sum of key, count)}`` over the rows where ``key`` is not None."""
    groups: dict[str, tuple[float, int]] = {}
    for r in rows:
        if r[key] is not None:
            total, count = groups.get(r["prompt"], (0.0, 0))
            groups[r["prompt"]] = (total + float(r[key]), count + 1)
    return groups


def paired_difference(rows_a: list[dict], rows_b: list[dict], key: str = "faithfulness", level: float = 0.95,
                      draws: int = 2000, seed: int = 0) -> dict | None:
    """Mean of ``key`` over set A minus set B, prompt by prompt (both scored on the same prompts), with a
    percentile bootstrap interval over prompts: ``{"difference", "low", "high", "prompts"}``."""
    a, b = _prompt_means(rows_a, key), _prompt_means(rows_b, key)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diff = np.array([a[p][0] / a[p][1] - b[p][0] / b[p][1] for p in common])
    pick = np.random.default_rng(seed).integers(len(diff), size=(draws, len(diff)))
    lo, hi = np.quantile(diff[pick].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(diff.mean()), "low": float(lo), "high": float(hi), "prompts": len(common)}


def bootstrap_interval(rows: list[dict], key: str, level: float = 0.95, draws: int = 2000,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``key`` over ``rows``, resampling whole prompts (the videos of
    one prompt are not independent draws: the prompt decides much of what a model gets right)."""
    groups = _prompt_means(rows, key)
    if not groups:
        return None
    sums = np.array([total for total, _ in groups.values()])
    counts = np.array([count for _, count in groups.values()])
    pick = np.random.default_rng(seed).integers(len(sums), size=(draws, len(sums)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def distance_to_real(gen_features: np.ndarray, real_features: np.ndarray) -> dict:
    """Set distances of generated to real features, with the real set's own leave-one-out spread as a scale."""
    out = {"num_generated": len(gen_features), "num_real": len(real_features), "frechet": None,
           "nearest_neighbour": None, "real_nearest_neighbour": None, "nearest_neighbour_ratio": None}
    if len(gen_features) == 0 or len(real_features) < 2:
        return out
    if len(gen_features) >= 2:
        out["frechet"] = frechet_distance(gen_features, real_features)
    out["nearest_neighbour"] = nearest_neighbour_distance(gen_features, real_features)
    out["real_nearest_neighbour"] = nearest_neighbour_distance(real_features, real_features, exclude_self=True)
    out["nearest_neighbour_ratio"] = out["nearest_neighbour"] / max(out["real_nearest_neighbour"], 1e-12)
    return out


def evaluate_clips(prompts: list[str], videos: list[np.ndarray], real: list | None = None, num_real: int = 64,
                   real_seed: int = 0, settings: DetectorSettings | None = None,
                   names: list[str] | None = None) -> dict:
    """Score in-memory clips against their prompts and against real clips.

    Args:
        prompts: one synthetic caption per clip.
        videos: uint8 ``[T, H, W, 3]`` clips (any T >= 2).
        real: ``(caption, clip)`` pairs of real clips; None: :func:`reference_clips` ``(num_real, real_seed)`` at the
            first clip's size (``num_real=0`` skips the distance).
        names: optional per-clip names copied into the per-clip results (e.g. file names).

    Returns:
        JSON-ready ``{"videos": [...], "aggregate": {...}, "chance": CHANCE, "distance": {...}, "settings": {...}}``;
        per-clip entries are :func:`score_video` results without their feature vectors.
    """
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts for {len(videos)} videos")
    settings = settings or DetectorSettings()
    rows = [score_video(v, p, settings) for p, v in zip(prompts, videos)]
    for i, row in enumerate(rows):
        if names is not None:
            row["name"] = names[i]
    aggregate = {key: _mean(rows, key) for key in (*SCORES, "faithfulness", "centroid_step", "frame_diff",
                                                   "area_stability", *DIAGNOSTICS)}
    aggregate["count"] = len(rows)
    aggregate["interval95"] = {key: bootstrap_interval(rows, key) for key in (*SCORES, "faithfulness")}
    aggregate["seconds_per_video"] = _mean(rows, "seconds")
    distance = {"reference": None}
    if real is None and num_real > 0 and videos:
        t, h, w = np.asarray(videos[0]).shape[:3]
        real = reference_clips(num_real, real_seed, t, h, w)
        distance["reference"] = (f"held-out split of toy.world.make_split(seed={real_seed}), first {num_real} "
                                 f"clips, {t}x{h}x{w}")
    if real:
        start = time.perf_counter()
        real_features = np.array([score_video(v, p, settings)["features"] for p, v in real])
        gen_features = np.array([r["features"] for r in rows])
        distance.update(distance_to_real(gen_features, real_features))
        distance["reference"] = distance["reference"] or f"{len(real)} given real clips"
        distance["seconds"] = time.perf_counter() - start
    for row in rows:
        row.pop("features")
    logger.debug("toy eval of %d clips: faithfulness %s, distance %s", len(rows), aggregate["faithfulness"], distance)
    return {"videos": rows, "aggregate": aggregate, "chance": dict(CHANCE), "distance": distance,
            "settings": asdict(settings)}
