"""Weight-only int8 storage for frozen networks (``text_encoder_int8``: UMT5-XXL in 5.8 GB instead of 11.4).

Each weight row is cut into groups of ``GROUP`` input features (the whole row where the width is not a multiple); a
group is stored as int8 with one scale ``amax / 127`` in the weight's dtype. The layer dequantises its weight to the
activation dtype right before its product, so only storage shrinks: the products, the norms and the attention run as
before. Accuracy against the bf16 encoder: docs/performance.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 128
INT8_MAX = 127
CHUNK_ELEMENTS = 2**24   # quantised at a time (64 MB in float32): UMT5's 1B-entry embedding needs no 4 GB copies


def group_size(width: int) -> int:
    return GROUP if width % GROUP == 0 else width


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[N, K]`` -> (int8 ``[N, K]``, scales ``[N, K // group]`` in ``weight``'s dtype), symmetric per group:
    ``weight ≈ q * scale`` with the group's largest magnitude on ±127. The rounding is done in float32 on the scale
    as stored, so that dequantising reproduces it."""
    rows, width = weight.shape
    group = group_size(width)
    q = torch.empty(rows, width, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, width // group, dtype=weight.dtype, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // width)   # rows at a time: float32 copies of a chunk, not of the whole table
    for start in range(0, rows, step):
        w = weight[start:start + step].detach().float().view(-1, width // group, group)
        s = (w.abs().amax(-1) / INT8_MAX).clamp_min(torch.finfo(weight.dtype).tiny).to(weight.dtype)
        q[start:start + step] = torch.round(w / s.float().unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).flatten(1)
        scale[start:start + step] = s
    return q, scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` in ``dtype`` (each entry one rounding of ``q * scale``)."""
    rows, width = q.shape
    return (q.view(rows, scale.shape[1], -1).to(dtype) * scale.to(dtype).unsqueeze(-1)).view(rows, width)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` whose weight is stored as grouped int8 (module docstring). ``weight`` keeps its name (with
    dtype int8) so that code testing a layer's weight dtype, as transformers' T5 FFN does, sees an int8 layer."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_groups(linear.weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize_groups(self.weight, self.weight_scale, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 groups of " \
               f"{group_size(self.in_features)}"


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` (no padding index, no norm limits) whose table is stored as grouped int8; only the rows
    looked up are dequantised."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        if embedding.max_norm is not None:
            raise ValueError("Int8Embedding does not renormalise rows (max_norm is set)")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        q, scale = quantize_groups(embedding.weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, scale = F.embedding(ids, self.weight), F.embedding(ids, self.weight_scale)
        return (q.unflatten(-1, (scale.shape[-1], -1)).to(scale.dtype) * scale.unsqueeze(-1)).flatten(-2)


def quantize_int8_(module: nn.Module, embeddings: tuple[str, ...] = ()) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``module`` by :class:`Int8Linear` and the ``nn.Embedding`` modules
    named in ``embeddings`` (paths from ``module``) by :class:`Int8Embedding`; embeddings sharing one table (tied)
    share one int8 copy. Returns ``module``."""
    wanted = set(embeddings)
    groups: dict[int, list[str]] = {}   # paths of one layer (or of embeddings sharing one table), found while all live
    for path, child in module.named_modules(remove_duplicate=False):
        if isinstance(child, nn.Linear) or (isinstance(child, nn.Embedding) and path in wanted):
            groups.setdefault(id(child) if isinstance(child, nn.Linear) else id(child.weight), []).append(path)
    for paths in groups.values():   # by name, no float layer held past its conversion: peak memory one layer
        child = module.get_submodule(paths[0])
        new = Int8Linear(child) if isinstance(child, nn.Linear) else Int8Embedding(child)
        del child
        for path in paths:
            parent, _, name = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, name, new)
    missing = wanted - {p for p, m in module.named_modules(remove_duplicate=False) if isinstance(m, Int8Embedding)}
    if missing:
        raise ValueError(f"no embedding named {', '.join(sorted(missing))}")
    return module
