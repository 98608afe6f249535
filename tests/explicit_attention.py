"""An explicit recomputation of one cached forward, for tests: no KVCache, no slots, no re-basing.

Each frame's keys are kept unrotated, per layer, together with the value; a call names the rotary position of every
frame it attends to and its own, and the keys are rotated there (RoPE written out from model_and_inference.md §2.5 in
float64, not taken from model/rope.py) and attended with a plain float64 softmax. The layers' projections, norms,
modulation, cross-attention and feed-forward are the model's own modules: what is checked is the cache's bookkeeping
of *which* frames a call sees and *where* they sit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.wan import AttnPlan, Cross, WanModel

THETA = 10000.0


@dataclass
class Frame:
    """One frame's self-attention memory: unrotated keys and values per layer, ``[B, S, N, d]`` each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def _angles(head_dim: int, frame: float, rows: int, cols: int) -> torch.Tensor:
    """float64 angles ``[rows*cols, head_dim/2]`` of the tokens of one frame at temporal position ``frame``."""
    c = head_dim // 2
    pairs = (c - 2 * (c // 3), c // 3, c // 3)

    def freqs(p):
        return THETA ** (-torch.arange(p, dtype=torch.float64) * 2 / (2 * p))
    f, r, w = (freqs(p) for p in pairs)
    rr, cc = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                            indexing="ij")
    return torch.cat([(frame * f).expand(rows * cols, -1), rr.reshape(-1, 1) * r, cc.reshape(-1, 1) * w], dim=1)


def rotate(x: torch.Tensor, positions: list[float], rows: int, cols: int) -> torch.Tensor:
    """Rotate ``x [B, F·rows·cols, N, d]`` (frames in order) to the frame ``positions``; float64."""
    angles = torch.cat([_angles(x.shape[-1], p, rows, cols) for p in positions])        # [L, d/2]
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())           # [B, L, N, d/2]
    z = z * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(z).flatten(-2)


def call(model: WanModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, own: list[float],
         memory: list[tuple[float, Frame]]) -> tuple[torch.Tensor, list[Frame]]:
    """One forward of frames ``x [B, n, C, H, W]`` at rotary positions ``own``, attending (in both directions) to
    each other and to ``memory`` = ``[(position, frame), ...]``. Returns the flow and the call's own frames."""
    with torch.no_grad():
        tokens, (f, rows, cols) = model._patchify(x)
        e, e0 = model._time(t, f, tokens.dtype)
        ctx = model.embed_text(context)
        per_frame = rows * cols
        half = model.config.head_dim // 2
        identity = AttnPlan(torch.ones(f * per_frame, half), torch.zeros(f * per_frame, half), cross=Cross.CONTEXT)
        h = tokens
        new = [Frame([], []) for _ in range(f)]
        for i, block in enumerate(model.blocks):
            shift1, scale1, gate1, shift2, scale2, gate2 = (block.modulation.unsqueeze(0) + e0).chunk(6, dim=2)
            q, k, v = block._self_attn_in(h, shift1, scale1, identity.cos, identity.sin)   # unrotated
            for j in range(f):
                new[j].keys.append(k[:, j * per_frame:(j + 1) * per_frame])
                new[j].values.append(v[:, j * per_frame:(j + 1) * per_frame])
            keys = [rotate(fr.keys[i], [p], rows, cols) for p, fr in memory] + [rotate(k, own, rows, cols)]
            values = [fr.values[i].double() for _, fr in memory] + [v.double()]
            keys, values = torch.cat(keys, 1), torch.cat(values, 1)
            qr = rotate(q, own, rows, cols)
            scores = torch.einsum("bqnd,bknd->bnqk", qr, keys) / qr.shape[-1] ** 0.5
            y = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), values).to(v.dtype)
            h, cq = block._cross_attn_in(h, y, gate1)
            c = block.cross_attn.attend(cq, ctx, identity, i)
            h = block._ffn(h, c, shift2, scale2, gate2)
        return model._unpatchify(model.head(h, e), (f, rows, cols)), new
