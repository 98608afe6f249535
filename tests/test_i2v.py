"""Image-to-video input: the published folder layout and our ``image<TAB>prompt`` file, the resize filter, errors."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from app.jobs import image_pixels, read_image_prompts
from toy.folders import write_tiny_wan_folder
from utils.errors import DataError

YAML = """
trainer: score_distillation
wan_models_dir: {root}
generator_name: Tiny
text_encoder_name: Tiny
image_or_video_shape: [1, 5, 16, 4, 6]
num_training_frames: 5
height: 32
width: 48
denoising_step_list: [1000, 500]
warp_denoising_step: true
"""
CAPTION = "a red circle moving left slowly"


def write_image(path, seed=0, size=(60, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_published_folder(folder, items, ratio="26-15"):
    """The published layout: target_crop_info_<ratio>.json (with its crop fields) and the images under <ratio>/."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = [{"file_name": name, "caption": caption, "target_crop": {"target_bbox": [0, 0, 60, 40],
             "target_ratio": ratio}, "type": "t", "origin_width": 60, "origin_height": 40}
            for name, caption in items]
    (folder / f"target_crop_info_{ratio}.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    write_tiny_wan_folder(root / "Tiny")
    (root / "cfg.yaml").write_text(YAML.format(root=root))
    write_image(root / "published" / "26-15" / "000001.png")
    write_published_folder(root / "published", [("000001.png", CAPTION)])
    (root / "ours.txt").write_text(f"published/26-15/000001.png\t{CAPTION}\n")
    return root


def generate(world, out, data):
    argv = ["--config_path", str(world / "cfg.yaml"), "--data_path", str(data), "--output_folder", str(out),
            "--device", "cpu", "--i2v", "--save_latents", "--seed", "3"]
    assert inference.main(argv) == 0
    return torch.load(out / f"{CAPTION}.latents.pt", weights_only=True)


def test_published_folder_and_tab_file_give_the_same_video(world, tmp_path):
    folder = generate(world, tmp_path / "folder", world / "published")
    tab = generate(world, tmp_path / "tab", world / "ours.txt")
    assert os.path.isfile(tmp_path / "folder" / f"{CAPTION}.mp4")
    assert folder.shape == (1, 4, 16, 4, 6) and torch.equal(folder, tab)   # the frames after the image


def test_the_image_conditions_the_video(world, tmp_path):
    write_image(tmp_path / "other" / "26-15" / "000001.png", seed=1)
    write_published_folder(tmp_path / "other", [("000001.png", CAPTION)])
    assert not torch.equal(generate(world, tmp_path / "a", world / "published")[:, :1],
                           generate(world, tmp_path / "b", tmp_path / "other")[:, :1])


def test_images_are_resized_with_pil_bilinear(tmp_path):
    """The published transform is torchvision's Resize((480, 832)) on a PIL image = PIL's bilinear resize to exactly
    that size (aspect ratio not kept), then [0, 1] -> [-1, 1]."""
    path = write_image(tmp_path / "img.png", size=(90, 50))
    got = image_pixels(str(path), 32, 48)
    with Image.open(path) as img:
        for method, same in ((Image.Resampling.BILINEAR, True), (Image.Resampling.BICUBIC, False)):
            want = np.asarray(img.resize((48, 32), method), dtype=np.float32) / 255 * 2 - 1
            assert torch.allclose(got, torch.from_numpy(want).permute(2, 0, 1), atol=1e-6) == same


def test_shipped_sample_folder(repo_root):
    pairs = read_image_prompts(repo_root / "prompts" / "i2v")
    assert len(pairs) >= 1 and all(os.path.isfile(image) and caption for image, caption in pairs)
    assert image_pixels(pairs[0][0], 480, 832).shape == (3, 480, 832)


@pytest.mark.parametrize("setup,message", [
    ("no_json", "must hold exactly one target_crop_info_*.json, found 0"),
    ("two_json", "found 2"),
    ("missing_image", "image not found"),
    ("bad_json", "expected a JSON list"),
    ("missing_file", "I2V prompts not found"),
    ("no_tab", "expected 'image_path<TAB>prompt'"),
])
def test_bad_i2v_inputs_are_one_line_errors(tmp_path, setup, message):
    folder = tmp_path / "i2v"
    folder.mkdir()
    data = folder
    if setup == "two_json":
        write_published_folder(folder, [], ratio="26-15")
        write_published_folder(folder, [], ratio="16-9")
    elif setup == "missing_image":
        write_published_folder(folder, [("gone.png", "x")])
    elif setup == "bad_json":
        (folder / "target_crop_info_1-1.json").write_text('{"file_name": "a.png"}')
    elif setup == "missing_file":
        data = tmp_path / "nope.txt"
    elif setup == "no_tab":
        data = tmp_path / "prompts.txt"
        data.write_text("just a prompt\n")
    with pytest.raises(DataError, match=message.replace("*", r"\*").replace("(", r"\(")) as info:
        read_image_prompts(data)
    assert "\n" not in str(info.value)
