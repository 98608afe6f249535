"""Optional fast preview decoder (``--preview_decoder FILE``): the decoder half of TAEHV
(https://github.com/madebyollin/taehv, e.g. ``taew2_1.pth``) for Wan latents; lower quality, a fraction of the cost.

``decoder`` is one ``nn.Sequential`` whose indices are the file's key names (``decoder.<i>.``):

    0 soft clamp 3*tanh(x/3) | 1 conv 3x3 latent->w0 | 2 ReLU
    3-5 memory blocks (w0) | 6 2x nearest | 7 time grow x1 | 8 conv w0->w1 (no bias)
    9-11 memory blocks (w1) | 12 2x nearest | 13 time grow x2 | 14 conv w1->w2 (no bias)
    15-17 memory blocks (w2) | 18 2x nearest | 19 time grow x2 | 20 conv w2->w3 (no bias)
    21 ReLU | 22 conv 3x3 w3->3

A video's first three frames are dropped, so ``f`` normalised latent frames give ``1 + 4(f - 1)`` frames in [-1, 1],
as with the Wan VAE."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.loader import load_strict, read_weights_file
from model.weights import check_file

log = logging.getLogger(__name__)

TAEHV_WAN21 = dict(latent_channels=16, widths=(256, 128, 64, 64), time_grow=(1, 2, 2))
"""``taew2_1.pth``: Wan2.1 latents (16 channels), 8x space and 4x time up."""
PREVIEW_HINT = "download taew2_1.pth from https://github.com/madebyollin/taehv"


def _conv(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(x / 3)


class MemoryBlock(nn.Module):
    """``relu(convs(cat(x_t, x_{t-1})) + x_t)``, zeros before the first frame: one frame of state per block."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TimeGrow(nn.Module):
    """A 1x1 convolution to ``stride`` times the channels read as ``stride`` consecutive frames: ``[N, C, H, W]`` ->
    ``[N * stride, C, H, W]``."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


class TinyVideoDecoder(nn.Module):
    """The preview decoder network; :meth:`stream` decodes a video chunk by chunk."""

    def __init__(self, latent_channels: int = 16, widths: tuple[int, ...] = (256, 128, 64, 64),
                 time_grow: tuple[int, ...] = (1, 2, 2)):
        super().__init__()
        w = widths
        layers: list[nn.Module] = [SoftClamp(), _conv(latent_channels, w[0]), nn.ReLU()]
        for stage, stride in enumerate(time_grow):
            layers += [MemoryBlock(w[stage]) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), TimeGrow(w[stage], stride),
                       _conv(w[stage], w[stage + 1], bias=False)]
        layers += [nn.ReLU(), _conv(w[-1], 3)]
        self.decoder = nn.Sequential(*layers)
        self.temporal_compression = math.prod(time_grow)
        self.spatial_compression = 2 ** len(time_grow)
        self.latent_channels = latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        return 1 + self.temporal_compression * (num_latent_frames - 1)

    def stream(self, frames_per_call: int | None = None) -> PreviewStream:
        """A streaming decode (``frames_per_call``: the Wan VAE's interface; each chunk is one pass)."""
        return PreviewStream(self)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole video: normalised ``[B, f, C, h, w]`` -> ``[B, 1 + 4(f-1), 3, 8h, 8w]`` float32 in [-1, 1]."""
        return self.stream().decode_chunk(latents)

    def compile_decoder(self, enabled: bool = True, **options) -> TinyVideoDecoder:
        return self  # the Wan VAE's fast-path hook; 2-D convolutions and ReLUs: nothing for inductor to fuse that pays

    def to_channels_last(self) -> TinyVideoDecoder:
        return self.to(memory_format=torch.channels_last)

    @classmethod
    def from_file(cls, path: str | Path, device="cpu", dtype=torch.float32, **config) -> TinyVideoDecoder:
        """Load the decoder half of a TAEHV file (``encoder.*`` keys are ignored). ``config`` defaults to
        :data:`TAEHV_WAN21`."""
        check_file(path, "preview decoder", PREVIEW_HINT)
        state = {k: v for k, v in read_weights_file(path).items() if not k.startswith("encoder.")}
        model = cls(**{**TAEHV_WAN21, **config})
        for i, layer in enumerate(model.decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TimeGrow) and key in state and state[key].shape[0] > layer.conv.out_channels:
                # files store the x1 time-grow layer at full width; its output is the last frame's channels
                state[key] = state[key][-layer.conv.out_channels:]
        load_strict(model, state, str(path), "the preview decoder")
        log.info("preview decoder: loaded %s", path)
        return model.to(device, dtype).eval()


class PreviewStream:
    """Chunk-by-chunk decode carrying one frame of state per memory block; equals the one-shot decode."""

    def __init__(self, model: TinyVideoDecoder):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._memory: dict[int, torch.Tensor] = {}
        self.num_latent_frames = 0

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, f, C, h, w]`` -> float32 ``[B, T, 3, 8h, 8w]`` in [-1, 1]; T = 1 + 4(f - 1) for a
        video's first chunk, 4f after it."""
        if latents.ndim != 5 or latents.shape[1] < 1:
            raise ValueError(f"decode_chunk expects [B, f>=1, C, h, w], got {tuple(latents.shape)}")
        b = latents.shape[0]
        x = latents.to(self.model.dtype)
        for i, layer in enumerate(self.model.decoder):
            flat = x.flatten(0, 1)
            if isinstance(layer, MemoryBlock):
                previous = self._memory.get(i, torch.zeros_like(x[:, :1]))
                past = torch.cat([previous, x[:, :-1]], 1).flatten(0, 1)
                self._memory[i] = x[:, -1:]
                x = layer(flat, past).unflatten(0, (b, -1))
            else:
                x = layer(flat).unflatten(0, (b, -1))
        trim = self.model.temporal_compression - 1 if self.num_latent_frames == 0 else 0  # the video's first frames
        self.num_latent_frames += latents.shape[1]
        return (x[:, trim:].float().clamp(0, 1) * 2 - 1)
