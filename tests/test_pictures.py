"""toy/pictures.py: frame strips and the animated preview put every frame where it belongs, and a recipe run's
sample folder is read as inference.py named its files (no model runs here: the shipped models' own tests cover
their videos)."""

import os

import numpy as np
import pytest

from toy import pictures
from utils.video import read_mp4, safe_output_name, write_mp4

PROMPTS = ["a red circle moving down quickly", "a red circle moving down quickly", "a blue square moving up slowly"]


def videos(p=3, t=9, h=8, w=8):
    """Videos whose every pixel names its (video, frame) pair, so a misplaced frame shows."""
    frames = np.zeros((p, t, h, w, 3), np.uint8)
    for i in range(p):
        for j in range(t):
            frames[i, j] = (40 * i + 10, 20 * j + 5, 200)
    return frames


def test_strip_places_every_fourth_frame_of_each_video_in_its_row():
    frames = videos()
    image = np.asarray(pictures.strip(frames, PROMPTS))
    h, w, gap, label = 8, 8, pictures.GAP, pictures.LABEL_WIDTH
    columns = range(0, 9, pictures.FRAME_STEP)                      # frames 0, 4, 8
    assert image.shape == (3 * (h + gap), label + len(columns) * (w + gap), 3)
    for row in range(3):
        for col, frame in enumerate(columns):
            y, x = row * (h + gap), label + col * (w + gap)
            assert (image[y:y + h, x:x + w] == frames[row, frame]).all()
            assert (image[y + h:y + h + gap, x:x + w] == 255).all()  # white gap below


def test_preview_grids_the_videos_frame_by_frame():
    frames = videos(p=5)
    gif = pictures.preview(frames)
    assert len(gif) == 9 and gif[0].size == (pictures.PREVIEW_COLUMNS * 8, 2 * 8)
    last = np.asarray(gif[8].convert("RGB"))
    assert (last[8:16, 0:8] == frames[4, 8]).all()                   # video 4: second row, first column
    assert (last[8:16, 8:16] == 0).all()                             # no video 5: black


def test_folder_videos_reads_sample_0_of_each_prompt(tmp_path):
    used: set[str] = set()
    stems = [safe_output_name(p, used=used) for p in PROMPTS]      # the repeated prompt gets its own name
    frames = videos(t=5, h=16, w=16)
    for i, stem in enumerate(stems):
        for k in range(2):                                           # --num_samples 2: <stem>-0, <stem>-1
            write_mp4(tmp_path / f"{stem}-{k}.mp4", frames[i] if k == 0 else 255 - frames[i], fps=8)
    read = pictures.folder_videos(tmp_path, PROMPTS)
    assert read.shape == (3, 5, 16, 16, 3)
    for i, stem in enumerate(stems):
        assert np.array_equal(read[i], read_mp4(tmp_path / f"{stem}-0.mp4"))
    assert np.abs(read.astype(int) - frames).mean() < 3              # the flat colours survive H.264
    (tmp_path / f"{stems[2]}-0.mp4").unlink()
    assert pictures.folder_videos(tmp_path, PROMPTS) is None


@pytest.mark.parametrize("present", [True, False])
def test_recipe_strips_draw_the_rows_whose_videos_exist(tmp_path, present):
    folder = tmp_path / "work" / "samples" / "dmd_chunkwise_4"
    folder.mkdir(parents=True)
    if present:
        for prompt in PROMPTS[2:]:
            write_mp4(folder / f"{safe_output_name(prompt)}.mp4", videos(p=1, t=5)[0], fps=8)
    assert pictures.recipe_strips(tmp_path / "work", PROMPTS[2:], tmp_path) == int(present)
    assert (tmp_path / "toy_dmd_chunkwise_4.png").is_file() == present


def test_recipe_strips_sample_a_row_that_has_a_model_but_no_videos(tmp_path, monkeypatch):
    """With a device, a row whose model exists but whose videos do not (no ffmpeg on the machine that ran the recipe)
    is sampled for its strip: that row's model, the strip's prompts in one batch, seed 0."""
    from toy import diagnose
    from toy.recipe import table_rows

    row = next(r for r in table_rows() if r.name == "dmd_framewise_4")
    model = (row, str(tmp_path / "dmd.pt"), tmp_path / "base")
    monkeypatch.setattr(diagnose, "available_rows", lambda workdir: [model])
    calls = []

    def sample_row(*args):
        calls.append(args)
        return list(videos(p=len(args[3])))

    monkeypatch.setattr(diagnose, "sample_row", sample_row)
    assert pictures.recipe_strips(tmp_path / "work", PROMPTS, tmp_path) == 0 and not calls   # no device: no model
    assert pictures.recipe_strips(tmp_path / "work", PROMPTS, tmp_path, "cpu") == 1
    assert [a[:5] for a in calls] == [(*model, PROMPTS, 0)] and str(calls[0][6]) == "cpu"
    image = np.asarray(pictures.Image.open(tmp_path / "toy_dmd_framewise_4.png").convert("RGB"))
    assert image.shape[0] == len(PROMPTS) * (8 + pictures.GAP)
    # drawn after its model: kept by the next call; a newer model gets a new strip
    (tmp_path / "dmd.pt").touch()
    os.utime(tmp_path / "dmd.pt", (1, 1))
    assert pictures.recipe_strips(tmp_path / "work", PROMPTS, tmp_path, "cpu") == 1 and len(calls) == 1
    os.utime(tmp_path / "dmd.pt", None)
    os.utime(tmp_path / "toy_dmd_framewise_4.png", (1, 1))
    assert pictures.recipe_strips(tmp_path / "work", PROMPTS, tmp_path, "cpu") == 1 and len(calls) == 2


def test_ground_truth_strip_shows_what_each_prompt_asks_for():
    """The ground-truth videos are the toy world's renderings of the prompts: the evaluator (an independent reading of
    the pixels) finds every attribute of every prompt in them, with the object in frame 0."""
    from toy.eval import evaluate_clips

    prompts = ["a red circle moving down quickly", "a blue square moving up slowly",
               "a green triangle moving left slowly"]
    frames = pictures.ground_truth_videos(prompts)
    assert frames.shape == (3, 33, 64, 64, 3) and frames.dtype == np.uint8
    result = evaluate_clips(prompts, list(frames))
    assert result["aggregate"]["faithfulness"] == 1.0 and all(v["frame0_present"] for v in result["videos"])
    assert not np.array_equal(frames, pictures.ground_truth_videos(prompts, seed=1))   # the seed draws the clips
