"""fp8 matrix products for inference (``--fp8``; docs/architecture.md, accuracy and speed: docs/performance.md).

Row-wise scaling: every activation and weight row is divided by its own float32 scale ``amax / 448`` and rounded to
float8 e4m3; ``torch._scaled_mm`` accumulates in float32, applies the scales and the bias and writes bf16. The
cross-attention K/V, the embeddings and the head stay bf16 (a few rows or a small share of the time). The converted
state dict holds fp8 weights and scales, not the checkpoint's keys."""

from __future__ import annotations

import torch
from torch import nn

from utils.errors import ConfigError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max   # 448
MIN_CAPABILITY = (8, 9)            # fp8 tensor cores: Ada (sm_89), Hopper (sm_90) and newer


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` -> (e4m3 ``[M, K]``, float32 scales ``[M, 1]``) with ``x ≈ fp8 · scale`` row by row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX   # an all-zero row keeps a finite scale
    return (x.float() / scale).to(E4M3), scale


class Fp8Linear(nn.Module):
    """``y = x Wᵀ + b`` with row-wise fp8 operands (module docstring); replaces an ``nn.Linear`` for inference."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w8, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", scale.t().contiguous())   # [1, N]: one scale per output channel
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def check_fp8_device(device: torch.device) -> None:
    """Raise ConfigError (``--fp8``) unless ``device`` has fp8 tensor cores."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        raise ConfigError(f"--fp8: fp8 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                          f"or newer (Ada, Hopper, Blackwell); {device} has none")


def convert_to_fp8(model: nn.Module) -> None:
    """Replace the token-wise linear layers of every block of a :class:`~model.wan.WanModel` by
    :class:`Fp8Linear` (module docstring), in place. The q/k/v product becomes one fp8 product
    (:meth:`~model.wan.SelfAttention.fuse_qkv` first if it is not fused yet)."""
    for block in model.blocks:
        attn, cross = block.self_attn, block.cross_attn
        if isinstance(attn.o, Fp8Linear):
            continue   # converted already
        attn.fuse_qkv()
        w, b = attn.fused_qkv
        attn.fused_qkv = Fp8Linear(w, b)
        attn.o = Fp8Linear(attn.o.weight, attn.o.bias)
        cross.q = Fp8Linear(cross.q.weight, cross.q.bias)
        cross.o = Fp8Linear(cross.o.weight, cross.o.bias)
        for i in (0, 2):   # up and down products of the FFN (1 is its GELU)
            block.ffn[i] = Fp8Linear(block.ffn[i].weight, block.ffn[i].bias)
