"""Helpers of the numerical tests on tiny random Wan models (float32, CPU): the model, the relative error they are
checked with, and a noise function a recomputation can replay."""

from __future__ import annotations

import torch

from model.config import WanConfig
from model.wan import WanModel

TINY = WanConfig(dim=32, ffn_dim=64, freq_dim=16, text_dim=24, num_heads=2, num_layers=2, text_len=8)


def tiny_model(cfg: WanConfig = TINY, *, causal: bool = True, num_frame_per_block: int = 1, seed: int = 0,
               head_std: float = 0.1, **kwargs) -> WanModel:
    """A seeded random model in eval mode with its head drawn too (Wan zero-initialises the head, so the outputs of a
    fresh model would not depend on its input); ``kwargs`` go to :class:`WanModel`."""
    torch.manual_seed(seed)
    model = WanModel(cfg, causal=causal, num_frame_per_block=num_frame_per_block, **kwargs)
    with torch.no_grad():
        model.head.head.weight.normal_(std=head_std)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of ``a`` from the reference ``b``, relative to ``b``'s largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def recorded_noise(seed: int):
    """``(fn, drawn)``: a noise function (``fn(like)`` -> a draw of ``like``'s shape and dtype) that keeps what it
    drew in ``drawn``, so that a recomputation can replay the same draws in order."""
    generator = torch.Generator().manual_seed(seed)
    drawn: list[torch.Tensor] = []

    def fn(like: torch.Tensor) -> torch.Tensor:
        drawn.append(torch.randn(like.shape, generator=generator, dtype=like.dtype))
        return drawn[-1]
    return fn, drawn
