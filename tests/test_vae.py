"""WanVAE on a tiny random AutoencoderKLWan (float32, CPU), checked against diffusers' own encode/decode.

Tolerances: streaming vs one-shot decode 1e-5 (several latent frames per decoder call reorder float sums);
loaded checkpoints vs the source model exact (same weights, same ops).
"""

import logging
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderKLWan

from model.vae import (
    TINY_VAE_CONFIG,
    WAN21_VAE_CONFIG,
    WanVAE,
    convert_original_vae_state_dict,
)
from model.weights import WAN_VAE_FILENAME
from utils.errors import CheckpointError, WeightsMissingError

# Spec §6.3, written out again so the test does not read the constants it checks.
SPEC_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
             0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
SPEC_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE.from_config(**TINY_VAE_CONFIG)


@pytest.fixture(scope="module")
def latents():
    """Normalised latents, 7 frames of 2x2 (-> up to 25 pixel frames of 16x16)."""
    return torch.randn(1, 7, 16, 2, 2, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference_videos(vae, latents):
    """One-shot diffusers decodes of the first 6 and all 7 latent frames (shared by the streaming cases)."""
    return {n: diffusers_decode(vae, latents[:, :n]) for n in (6, 7)}


def diffusers_decode(vae: WanVAE, latents: torch.Tensor) -> torch.Tensor:
    """Independent reference: de-normalise by hand, diffusers' public decode, back to [B, T, 3, H, W]."""
    mean = torch.tensor(SPEC_MEAN).view(1, 1, -1, 1, 1)
    std = torch.tensor(SPEC_STD).view(1, 1, -1, 1, 1)
    z = (latents * std + mean).permute(0, 2, 1, 3, 4)
    return vae.model.decode(z).sample.permute(0, 2, 1, 3, 4)


def original_name(key: str) -> str:
    """diffusers -> original Wan VAE name (num_res_blocks = 2), from the mapping table of spec §7.2."""
    rules = [
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"\.conv_in\.", ".conv1."),
        (r"\.norm_out\.", ".head.0."),
        (r"\.conv_out\.", ".head.2."),
        (r"\.mid_block\.resnets\.0\.", ".middle.0."),
        (r"\.mid_block\.attentions\.0\.", ".middle.1."),
        (r"\.mid_block\.resnets\.1\.", ".middle.2."),
        (r"\.down_blocks\.", ".downsamples."),
    ]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    # spec: up_blocks.{0..3}.resnets.{0..2} regroup the flat list, resamplers sit at 3, 7, 11
    resnet_index = {(stage, i): 4 * stage + i for stage in range(4) for i in range(3)}
    upsampler_index = {0: 3, 1: 7, 2: 11}
    key = re.sub(
        r"\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f".upsamples.{resnet_index[int(m[1]), int(m[2])]}.", key
    )
    key = re.sub(r"\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f".upsamples.{upsampler_index[int(m[1])]}.", key)
    for new, old in [("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                     ("conv2", "residual.6"), ("conv_shortcut", "shortcut")]:  # fmt: skip
        key = re.sub(rf"(samples\.\d+|middle\.[02])\.{new}\.", rf"\1.{old}.", key)
    return key


def test_encode_decode_shapes(vae):
    pixels = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = vae.encode(pixels)
    assert z.shape == (1, 2, 16, 4, 4) and z.dtype == torch.float32
    video = vae.decode(z)
    assert video.shape == (1, 5, 3, 32, 32)
    assert video.min() >= -1 and video.max() <= 1
    assert vae.num_pixel_frames(6) == 21
    with pytest.raises(ValueError):
        vae.encode(pixels[:, :, :4])


def test_encode_applies_normalisation(vae):
    pixels = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mu = vae.model.encode(pixels).latent_dist.mean.permute(0, 2, 1, 3, 4)
    expected = (mu - torch.tensor(SPEC_MEAN).view(1, 1, -1, 1, 1)) / torch.tensor(SPEC_STD).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(vae.encode(pixels), expected, rtol=1e-6, atol=1e-6)


def test_config_statistics_are_used():
    torch.manual_seed(0)
    model = AutoencoderKLWan(**dict(TINY_VAE_CONFIG, latents_mean=[1.0] * 16, latents_std=[2.0] * 16))
    custom = WanVAE(model)
    mu = torch.randn(1, 2, 16, 2, 2)
    torch.testing.assert_close(custom.normalize(mu), (mu - 1) / 2)
    torch.testing.assert_close(custom.denormalize(custom.normalize(mu)), mu)
    assert WanVAE.from_config(**TINY_VAE_CONFIG).latents_std == SPEC_STD


def test_decode_matches_diffusers(vae, latents, reference_videos):
    video = vae.decode(latents[:, :6])
    assert video.shape == (1, 21, 3, 16, 16)
    torch.testing.assert_close(video, reference_videos[6], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunks", [[1] * 6, [1, 3, 3], [1, 2, 3], [3, 3], [6]])
@pytest.mark.parametrize("frames_per_call", [1, 2])
def test_streaming_equals_one_shot(vae, latents, reference_videos, chunks, frames_per_call):
    z = latents[:, : sum(chunks)]
    stream = vae.stream(frames_per_call=frames_per_call)
    pieces, start = [], 0
    for i, size in enumerate(chunks):
        piece = stream.decode_chunk(z[:, start : start + size])
        assert piece.shape[1] == (1 + 4 * (size - 1) if i == 0 else 4 * size)
        pieces.append(piece)
        start += size
    torch.testing.assert_close(torch.cat(pieces, 1), reference_videos[sum(chunks)], rtol=0, atol=1e-5)


def test_stream_reset_and_independence(vae, latents):
    stream, other = vae.stream(), vae.stream()
    first = torch.cat([stream.decode_chunk(latents[:, :1]), stream.decode_chunk(latents[:, 1:3])], 1)
    other.decode_chunk(latents[:, 3:5])  # a second stream must not disturb the first
    vae.model.decode(torch.zeros(1, 16, 2, 2, 2))  # nor must diffusers' own decode (it clears its own cache)
    rest = stream.decode_chunk(latents[:, 3:4])
    torch.testing.assert_close(torch.cat([first, rest], 1), diffusers_decode(vae, latents[:, :4]), rtol=0, atol=1e-5)
    stream.reset()
    torch.testing.assert_close(stream.decode_chunk(latents[:, :3]), first, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        stream.decode_chunk(latents[:, 3:4].expand(2, -1, -1, -1, -1))


def test_streaming_batch_of_two(vae):
    z = torch.randn(2, 4, 16, 2, 2, generator=torch.Generator().manual_seed(4))
    stream = vae.stream()
    video = torch.cat([stream.decode_chunk(z[:, :1]), stream.decode_chunk(z[:, 1:])], 1)
    for b in range(2):
        torch.testing.assert_close(video[b : b + 1], diffusers_decode(vae, z[b : b + 1]), rtol=0, atol=1e-5)


def test_channels_last(vae, latents):
    torch.manual_seed(0)
    fast = WanVAE.from_config(**TINY_VAE_CONFIG).to_channels_last()
    conv = fast.model.decoder.conv_in
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(fast.decode(latents[:, :3]), vae.decode(latents[:, :3]), rtol=0, atol=1e-5)


def test_original_names_match_spec_and_diffusers_converter():
    """On the full-size Wan2.1 VAE (meta tensors): 194 keys, 126,892,531 parameters, conversion agrees with both
    the spec's table (inverted above) and diffusers' converter."""
    with torch.device("meta"):
        full = AutoencoderKLWan(**WAN21_VAE_CONFIG)
    state = full.state_dict()
    assert len(state) == 194 and sum(v.numel() for v in state.values()) == 126_892_531
    original = {original_name(k): v for k, v in state.items()}
    assert len(original) == 194
    assert "decoder.upsamples.3.resample.1.weight" in original and "decoder.upsamples.7.time_conv.weight" in original
    assert "decoder.upsamples.11.resample.1.weight" in original  # last resampler is 2-D only:
    assert "decoder.upsamples.11.time_conv.weight" not in original
    assert "decoder.upsamples.4.shortcut.weight" in original and "encoder.middle.1.to_qkv.weight" in original
    assert sorted(convert_original_vae_state_dict(original, num_res_blocks=2)) == sorted(state)
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    assert sorted(convert_wan_vae_to_diffusers(original)) == sorted(state)


def test_load_original_checkpoint(vae, latents, tmp_path):
    original = {original_name(k): v.clone() for k, v in vae.model.state_dict().items()}
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    folder.mkdir()
    torch.save(original, folder / WAN_VAE_FILENAME)
    for path in (folder / WAN_VAE_FILENAME, folder):
        loaded = WanVAE.from_pretrained(path, base_dim=8)
        assert torch.equal(loaded.decode(latents[:, :3]), vae.decode(latents[:, :3]))
    pixels = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert torch.equal(loaded.encode(pixels), vae.encode(pixels))


def test_load_diffusers_folder(vae, latents, tmp_path):
    vae.model.save_pretrained(tmp_path / "vae")
    for path in (tmp_path / "vae", tmp_path):
        loaded = WanVAE.from_pretrained(path)
        assert loaded.model.config.base_dim == 8
        assert torch.equal(loaded.decode(latents[:, :2]), vae.decode(latents[:, :2]))
    warnings = []   # diffusers' own logger (it does not propagate to the root logger that caplog reads)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        half = WanVAE.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert half.dtype == torch.bfloat16 and half.decode(latents[:, :2]).dtype == torch.float32
    assert warnings == []   # diffusers' to() warns of "modules that should be kept in float32: []" for any dtype


def test_wrong_checkpoint_errors(vae, tmp_path):
    original = {original_name(k): v for k, v in vae.model.state_dict().items()}
    del original["decoder.head.2.weight"]
    original["decoder.extra.weight"] = torch.zeros(1)
    torch.save(original, tmp_path / "bad.pth")
    message = r"missing keys \(1\): decoder\.conv_out\.weight; unexpected keys \(1\): decoder\.extra\.weight$"
    with pytest.raises(CheckpointError, match=message):
        WanVAE.from_pretrained(tmp_path / "bad.pth", base_dim=8)
    torch.save({original_name(k): v for k, v in vae.model.state_dict().items()}, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(\d+\): "):
        WanVAE.from_pretrained(tmp_path / "tiny.pth")  # tiny weights, full-size Wan2.1 config
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError):
        WanVAE.from_pretrained(tmp_path / "list.pth")
    with pytest.raises(WeightsMissingError, match="hf download"):
        WanVAE.from_pretrained(tmp_path / "nowhere")
