"""Wan2.1 causal 3-D VAE over diffusers' ``AutoencoderKLWan`` (model_and_inference.md §6.3) in the ``[B, F, C, h, w]``
latent layout (diffusers: ``[B, C, F, h, w]``): ``F`` latent frames decode to ``1 + 4 (F - 1)`` pixel frames, 8x
spatially (factors from the config)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.loader import load_strict, read_weights_file
from model.vae_decoder import EAGER_REGIONS, decoder_step
from model.weights import WAN_VAE_FILENAME, wan_download_hint
from utils.errors import ConfigError, WeightsMissingError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan


def _autoencoder_class():
    """diffusers' ``AutoencoderKLWan``, imported on first use (importing diffusers costs seconds)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan


logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Per-channel statistics of Wan2.1 latents (reference utils/wan_wrapper.py); part of the VAE config.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

# ``AutoencoderKLWan`` arguments of the released Wan2.1 VAE (126.9M parameters, 194 tensors)
WAN21_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True], dropout=0.0, latents_mean=WAN21_LATENTS_MEAN,
                        latents_std=WAN21_LATENTS_STD)
TINY_VAE_CONFIG = dict(WAN21_VAE_CONFIG, base_dim=8)   # 0.92M parameters: tests and the toy world

# Original module names -> diffusers module names (spec §7.2). Residual blocks are nn.Sequential in the original.
_RESIDUAL_PARTS = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                   "shortcut": "conv_shortcut"}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_HEAD = {"0": "norm_out", "2": "conv_out"}
_TOP_LEVEL = {"conv1": "quant_conv", "conv2": "post_quant_conv"}


def convert_original_vae_key(key: str, num_res_blocks: int) -> str | None:
    """Diffusers name of an original Wan VAE parameter name, or None if it is not one. The original decoder's flat
    ``upsamples`` list holds per stage ``num_res_blocks + 1`` residual blocks and a resampler (none after the last),
    regrouped as ``up_blocks.<stage>.resnets.<i>`` / ``.upsamplers.0``; the encoder's ``downsamples`` keep their
    indices as ``down_blocks``."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in _TOP_LEVEL:
        return f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
    if len(parts) < 3 or parts[0] not in ("encoder", "decoder"):
        return None
    side, group, rest = parts[0], parts[1], parts[2:]
    if group == "conv1":
        module = "conv_in"
    elif group == "head" and rest[0] in _HEAD:
        module, rest = _HEAD[rest[0]], rest[1:]
    elif group == "middle" and rest[0] in _MIDDLE:
        module, rest = _MIDDLE[rest[0]], rest[1:]
    elif group == "downsamples" and side == "encoder" and rest[0].isdigit():
        module, rest = f"down_blocks.{rest[0]}", rest[1:]
    elif group == "upsamples" and side == "decoder" and rest[0].isdigit():
        stage, position = divmod(int(rest[0]), num_res_blocks + 2)
        inner = f"resnets.{position}" if position <= num_res_blocks else "upsamplers.0"
        module, rest = f"up_blocks.{stage}.{inner}", rest[1:]
    else:
        return None
    if not rest:
        return None
    tail = ".".join(rest)
    for original, renamed in _RESIDUAL_PARTS.items():
        if tail.startswith(original + "."):
            tail = renamed + tail[len(original) :]
            break
    return f"{side}.{module}.{tail}"


def convert_original_vae_state_dict(state_dict: dict[str, torch.Tensor], num_res_blocks: int) -> dict:
    """Rename an original-format state dict to diffusers names; unknown names are kept (reported on load)."""
    return {convert_original_vae_key(key, num_res_blocks) or key: value for key, value in state_dict.items()}


class WanVAE(nn.Module):
    """Frozen Wan VAE; latent statistics from ``model.config``, else Wan2.1's."""

    def __init__(self, model: AutoencoderKLWan) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.latents_mean = list(config.get("latents_mean") or WAN21_LATENTS_MEAN)
        self.latents_std = list(config.get("latents_std") or WAN21_LATENTS_STD)
        self.latent_channels = config.z_dim
        if len(self.latents_mean) != self.latent_channels or len(self.latents_std) != self.latent_channels:
            raise ConfigError(f"latents_mean/latents_std need {self.latent_channels} values (z_dim)")
        self.temporal_compression = 2 ** sum(config.temperal_downsample)
        self.spatial_compression = 2 ** (len(config.dim_mult) - 1)
        self.channels_last = False
        self._stats_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.regions = EAGER_REGIONS  # or compiled ones (compile_decoder)

    @classmethod
    def from_config(cls, **config) -> WanVAE:
        """Randomly initialised VAE from ``AutoencoderKLWan`` arguments (e.g. ``**TINY_VAE_CONFIG``)."""
        return cls(_autoencoder_class()(**config))

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype = torch.float32, **config) -> WanVAE:
        """Load a ``.pth``/``.safetensors`` file (original or diffusers key names), a folder holding
        ``Wan2.1_VAE.pth``, or a diffusers VAE folder (also as a pipeline's ``vae/``), strictly. ``config``:
        ``AutoencoderKLWan`` arguments overriding the Wan2.1 defaults (or the folder's config.json)."""
        path = Path(path)
        if path.is_dir() and (path / WAN_VAE_FILENAME).is_file():
            path = path / WAN_VAE_FILENAME
        elif path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if path.is_dir() and (path / "config.json").is_file():
            weights = path / DIFFUSERS_WEIGHTS_NAME
            if not weights.is_file():
                raise WeightsMissingError(f"VAE weights {weights} not found")
            full_config = {**_autoencoder_class().load_config(str(path)), **config}
        elif path.is_file():
            weights, full_config = path, {**WAN21_VAE_CONFIG, **config}
        else:
            folder = path.parent if path.name == WAN_VAE_FILENAME else path
            raise WeightsMissingError(f"VAE weights not found at {path}; {wan_download_hint(folder)}")
        state_dict = read_weights_file(weights)
        with torch.device("meta"):  # weights come from the file; skip the random initialisation
            model = _autoencoder_class().from_config(full_config)
        if "post_quant_conv.weight" not in state_dict:  # original Wan names
            state_dict = convert_original_vae_state_dict(state_dict, model.config.num_res_blocks)
        load_strict(model, state_dict, str(path), "the Wan VAE")
        logger.info("loaded Wan VAE from %s", path)
        # nn.Module.to, not diffusers' override: that one (0.42) warns of "modules that should be kept in float32: []"
        # whenever a dtype is given, though this VAE has none
        return cls(nn.Module.to(model, torch_dtype))

    def to_channels_last(self) -> WanVAE:
        """Convolution weights and inputs channels-last (faster cuDNN kernels); module by module, as the upsamplers'
        frame-wise convolutions are 2-D."""
        for module in self.model.modules():
            if isinstance(module, nn.Conv3d):
                module.to(memory_format=torch.channels_last_3d)
            elif isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def compile_decoder(self, enabled: bool = True, **options) -> WanVAE:
        """``torch.compile`` the streaming decoder's regions (``enabled=False``: eager), static shapes: a video's first
        call (one frame, no cache) and every later call (``frames_per_call`` frames) compile once per shape."""
        # a few graphs per region and resolution; switching resolution or options in one process adds more
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.regions = EAGER_REGIONS.compiled(**options) if enabled else EAGER_REGIONS
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.post_quant_conv.weight.device

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        return 1 + self.temporal_compression * (num_latent_frames - 1)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 mean/std ``[1, 1, C, 1, 1]`` on ``device``, copied once per device."""
        if device not in self._stats_by_device:
            self._stats_by_device[device] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 1, -1, 1, 1).to(device)
                                                  for v in (self.latents_mean, self.latents_std))
        return self._stats_by_device[device]

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """``(mu - mean) / std`` in float32; ``mu`` is ``[B, F, C, h, w]``."""
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """``z * std + mean`` in float32; ``latents`` is ``[B, F, C, h, w]``."""
        mean, std = self._stats(latents.device)
        return latents.float() * std + mean

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised posterior means: ``[B, 3, 1 + 4k, H, W]`` in [-1, 1] -> float32 ``[B, 1 + k, 16, H/8, W/8]``."""
        if pixels.ndim != 5 or (pixels.shape[2] - 1) % self.temporal_compression:
            raise ValueError(f"encode expects [B, 3, T, H, W] with T = 1 + {self.temporal_compression}k, "
                             f"got {tuple(pixels.shape)}")
        mu = self.model.encode(self._format(pixels)).latent_dist.mean  # [B, C, F, h, w]
        return self.normalize(mu.permute(0, 2, 1, 3, 4))

    def decode(self, latents: torch.Tensor, frames_per_call: int = 4) -> torch.Tensor:
        """Decode a whole video: normalised ``[B, F, 16, h, w]`` -> float32 ``[B, 1 + 4(F-1), 3, 8h, 8w]``, [-1, 1]."""
        return self.stream(frames_per_call).decode_chunk(latents)

    def stream(self, frames_per_call: int = 4) -> StreamingDecoder:
        """A fresh :class:`StreamingDecoder` (its own feature cache) for one video."""
        return StreamingDecoder(self, frames_per_call)


class StreamingDecoder:
    """Decodes a video chunk by chunk, carrying the decoder's causal feature cache between calls (diffusers'
    ``decode()`` restarts it per call): the first call one latent frame, later calls ``frames_per_call`` frames."""

    def __init__(self, vae: WanVAE, frames_per_call: int = 4) -> None:
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        self.vae = vae
        self.frames_per_call = frames_per_call
        self.reset()

    def reset(self) -> None:
        """Forget the previous video; the next chunk starts a new one."""
        self._cache: list[torch.Tensor] | None = None
        self._batch_size: int | None = None
        self.num_latent_frames = 0

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, f, 16, h, w]`` (B constant within a video) -> float32 ``[B, T, 3, 8h, 8w]`` in [-1, 1];
        ``T = 1 + 4(f - 1)`` for a video's first chunk, ``4f`` afterwards."""
        if latents.ndim != 5 or latents.shape[1] < 1:
            raise ValueError(f"decode_chunk expects [B, f>=1, C, h, w], got {tuple(latents.shape)}")
        if self._batch_size not in (None, latents.shape[0]):
            raise ValueError(f"batch size changed from {self._batch_size} to {latents.shape[0]} within a video")
        self._batch_size = latents.shape[0]
        z = self.vae._format(self.vae.denormalize(latents).permute(0, 2, 1, 3, 4))  # [B, C, f, h, w]
        x = self.vae.model.post_quant_conv(z)  # 1x1x1 conv: no temporal context needed
        outputs, start = [], 0
        decoder = self.vae.model.decoder
        layout = torch.channels_last_3d if self.vae.channels_last else torch.contiguous_format
        if self._cache is None:
            out, self._cache = decoder_step(decoder, x[:, :, :1], None, self.vae.regions, layout)
            outputs.append(out)
            start = 1
        for i in range(start, x.shape[2], self.frames_per_call):
            piece = x[:, :, i : i + self.frames_per_call]
            out, self._cache = decoder_step(decoder, piece, self._cache, self.vae.regions, layout)
            outputs.append(out)
        self.num_latent_frames += x.shape[2]
        pixels = torch.cat(outputs, dim=2).clamp(-1, 1)  # [B, 3, T_chunk, H, W]
        return pixels.permute(0, 2, 1, 3, 4).float()

