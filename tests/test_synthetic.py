"""Synthetic captioned videos: determinism, captioned motion, caption grammar, held-out split."""

import time

import numpy as np
import pytest

from toy.world import (
    COLORS,
    DIRECTIONS,
    SPEED_TRAVEL,
    VOCABULARY,
    all_combinations,
    format_caption,
    make_dataset,
    make_split,
    make_video,
    parse_caption,
    split_combinations,
)


def target_centroids(video: np.ndarray, color: str) -> np.ndarray:
    """Per-frame (x, y) centroid of the pixels of exactly the target colour, ``[T, 2]``."""
    mask = np.all(video == np.array(COLORS[color], dtype=np.uint8), axis=-1)
    assert mask.reshape(len(video), -1).any(axis=1).all(), "target colour missing in a frame"
    ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]]
    count = mask.sum(axis=(1, 2))
    return np.stack([(mask * xs).sum(axis=(1, 2)) / count, (mask * ys).sum(axis=(1, 2)) / count], axis=1)


def test_dataset_is_deterministic_and_prefix_stable():
    a, b = make_dataset(6, seed=3), make_dataset(6, seed=3)
    assert all(ca == cb and np.array_equal(va, vb) for (ca, va), (cb, vb) in zip(a, b))
    assert all(ca == cb and np.array_equal(va, vb) for (ca, va), (cb, vb) in zip(make_dataset(3, seed=3), a))
    tail = make_dataset(2, seed=3, first=4)   # a part rendered on its own equals the same samples of the whole
    assert all(ca == cb and np.array_equal(va, vb) for (ca, va), (cb, vb) in zip(tail, a[4:]))
    c = make_dataset(6, seed=4)
    assert any(not np.array_equal(va, vc) for (_, va), (_, vc) in zip(a, c))
    caption, video = a[0]
    assert video.shape == (33, 64, 64, 3) and video.dtype == np.uint8
    assert make_dataset(1, 0, num_frames=5, height=32, width=48)[0][1].shape == (5, 32, 48, 3)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("speed", list(SPEED_TRAVEL))
def test_object_moves_in_captioned_direction(direction, speed):
    for seed in range(3):
        attrs = {"color": "red", "shape": ("circle", "square", "triangle")[seed], "direction": direction,
                 "speed": speed}
        video = make_video(attrs, num_frames=33, height=64, width=80, rng=np.random.default_rng(seed),
                           num_distractors=2)
        track = target_centroids(video, "red")
        displacement = track[-1] - track[0]
        dx, dy = DIRECTIONS[direction]
        extent = 80 if dx else 64
        along = displacement[0] * dx + displacement[1] * dy
        across = displacement[0] * dy + displacement[1] * dx
        # Pixel-quantised shapes: allow 1.5 px of centroid jitter around the exact travel.
        assert abs(along - SPEED_TRAVEL[speed] * extent) < 1.5, (attrs, displacement)
        assert abs(across) < 1.5
        steps = np.diff(track, axis=0) @ np.array([dx, dy])
        assert (steps > -0.5).all()  # monotone motion, never backwards


def test_distractors_use_other_colours_and_background_is_plain():
    rng = np.random.default_rng(0)
    attrs = {"color": "blue", "shape": "circle", "direction": "left", "speed": "slow"}
    video = make_video(attrs, 8, 64, 64, rng, num_distractors=2)
    colours = {tuple(c) for c in video.reshape(-1, 3)}
    assert len(colours) == 4 and tuple(COLORS["blue"]) in colours  # background, target, two distractors
    empty = make_video(attrs, 8, 64, 64, np.random.default_rng(0), num_distractors=0)
    assert len({tuple(c) for c in empty.reshape(-1, 3)}) == 2


def test_caption_grammar_round_trip():
    combos = all_combinations()
    assert len(combos) == np.prod([len(v) for v in VOCABULARY.values()])
    for attrs in combos:
        assert parse_caption(format_caption(attrs)) == attrs
    assert format_caption({"color": "red", "shape": "circle", "direction": "left", "speed": "fast"}) == \
        "a red circle moving left quickly"
    assert format_caption({"color": "orange", "shape": "square", "direction": "up", "speed": "slow"}) == \
        "an orange square moving up slowly"
    assert parse_caption("  A Red  CIRCLE moving left quickly ")["color"] == "red"
    for bad in ["a red circle moving left", "a pink circle moving left slowly", "a red circle moving sideways fast",
                "a red circle moving left quickly and a blue square", ""]:
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_captions_of_dataset_parse():
    for caption, _ in make_dataset(20, seed=0, num_frames=2, height=16, width=16):
        parse_caption(caption)


def test_heldout_split_is_compositional():
    train, heldout = split_combinations(heldout_fraction=0.25, seed=1)
    key = lambda c: tuple(c.values())  # noqa: E731
    assert not {key(c) for c in train} & {key(c) for c in heldout}
    num_combos = len(all_combinations())
    assert len(train) + len(heldout) == num_combos and len(heldout) == round(0.25 * num_combos)
    for attribute, values in VOCABULARY.items():  # every single value is still seen in training
        assert {c[attribute] for c in train} == set(values)
    train_set, heldout_set = make_split(8, 4, seed=1, heldout_fraction=0.25, num_frames=3, height=16, width=16)
    heldout_keys = {key(c) for c in heldout}
    assert all(key(parse_caption(c)) in heldout_keys for c, _ in heldout_set)
    assert not any(key(parse_caption(c)) in heldout_keys for c, _ in train_set)


def test_fast_enough():
    rng = np.random.default_rng(0)
    attrs = {"color": "green", "shape": "triangle", "direction": "down", "speed": "fast"}
    make_video(attrs, 33, 64, 64, rng)
    start = time.perf_counter()
    for _ in range(10):
        make_video(attrs, 33, 64, 64, rng, num_distractors=2)
    assert (time.perf_counter() - start) / 10 < 0.05  # ~5 ms measured; generous bound for a shared CPU
