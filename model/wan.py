"""The Wan2.1 diffusion transformer, bidirectional (teacher, critic) and block-causal (generator), in one class with
the original parameter names. Latents are ``[B, F, C, H, W]``, timesteps ``[B, F]`` (``[B]`` is broadcast over
frames). The caller names one of three attention paths (docs/architecture.md, "The model: three attention paths")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import attention, compile_merge, kernel_scope
from model.config import WanConfig
from model.kv_cache import FULL, CachedCall, CacheMode, CacheView, KVCache
from model.masks import (
    BlockLayout,
    block_causal_frame_mask,
    dense_token_mask,
    flex_block_mask,
    teacher_forcing_frame_mask,
)
from model.rope import RotaryTables, apply_rope


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[N]`` timesteps -> ``[N, dim]`` features ``[cos(t·w), sin(t·w)]``, ``w_j = 10000^(-j/(dim/2))``, float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim; statistics in float32, then cast back and scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in the input dtype (the affine one is ``norm3``; the others have no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class Cross(str, Enum):
    """Where the cross-attention K/V of a call come from."""

    CONTEXT = "context"   # computed from the embedded context (full-sequence paths, rollout steps)
    FILL = "fill"         # computed, and stored in the cache (first inference call of a prompt)
    CACHED = "cached"     # read from the cache


@dataclass
class AttnPlan:
    """How the attention of one call runs (shared by all layers of that call)."""

    cos: torch.Tensor                 # [L, d/2] RoPE of every token of the call
    sin: torch.Tensor
    mask: Any = None                  # None, dense bool [L, L] or a flex BlockMask (full-sequence paths)
    call: CachedCall | None = None    # cached path: positions and attention set against the KV cache
    cross: Cross = Cross.CONTEXT


class Projections(nn.Module):
    """The q, k, v, o projections and the q/k RMSNorm over all heads of an attention layer."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = (RMSNorm(dim, eps) if qk_norm else nn.Identity() for _ in range(2))


class SelfAttention(Projections):
    def __init__(self, *args):
        super().__init__(*args)
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor] | nn.Module | None = None   # see fuse_qkv

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections, q/k RMSNorm over all heads, RoPE at the tokens' positions: three ``[B, L, N, d]``."""
        b, n = x.shape[:2]
        if self.fused_qkv is not None:  # one [D -> 3D] product (see fuse_qkv; a module once converted to fp8)
            fused = self.fused_qkv
            q, k, v = (fused(x) if callable(fused) else F.linear(x, *fused)).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = apply_rope(self.norm_q(q).view(b, n, self.num_heads, -1), cos, sin)
        k = apply_rope(self.norm_k(k).view(b, n, self.num_heads, -1), cos, sin)
        return q, k, v.view(b, n, self.num_heads, -1)

    def fuse_qkv(self) -> None:
        """One ``[3D, D]`` product for q, k, v (inference): three D x D products on a one-frame block use a third of
        an H100 (libraries.md §9). The parameters become views of the fused tensor: no memory added, state dict
        unchanged, later weight loads update it too."""
        if self.fused_qkv is not None:
            return
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight]).detach()
        b = torch.cat([self.q.bias, self.k.bias, self.v.bias]).detach()
        for i, lin in enumerate((self.q, self.k, self.v)):
            rows = slice(i * w.shape[1], (i + 1) * w.shape[1])
            lin.weight = nn.Parameter(w[rows], requires_grad=lin.weight.requires_grad)
            lin.bias = nn.Parameter(b[rows], requires_grad=lin.bias.requires_grad)
        self.fused_qkv = (w, b)


class CrossAttention(Projections):
    """Text cross-attention; no RoPE, no mask: all ``text_len`` (zero-padded) context rows are attended."""

    def kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, text_len, N, d]`` of the embedded context (cacheable per prompt)."""
        b, n = ctx.shape[:2]
        return (self.norm_k(self.k(ctx)).view(b, n, self.num_heads, -1), self.v(ctx).view(b, n, self.num_heads, -1))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        return self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)

    def attend(self, q: torch.Tensor, ctx: torch.Tensor | None, plan: AttnPlan, layer: int) -> torch.Tensor:
        """Queries ``[B, L, N, d]`` to the embedded context ``[B, text_len, D]``, K/V as ``plan.cross`` says."""
        cache = plan.call.cache if plan.call is not None else None
        if plan.cross is Cross.CACHED:
            return attention(q, cache.cross_k[layer], cache.cross_v[layer])
        k, v = self.kv(ctx)
        if plan.cross is Cross.FILL:  # each layer fills its own entry inside its forward (see KVCache)
            k, v = cache.store_cross(layer, k, v)
        return attention(q, k, v)


class WanBlock(nn.Module):
    REGIONS = ("_self_attn_in", "_cross_attn_in", "_ffn")   # the elementwise work between attention calls

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor | None, plan: AttnPlan,
                layer: int) -> torch.Tensor:
        """x ``[B, F·S, D]``, e0 ``[B, F, 6, D]`` per-frame modulation, ctx ``[B, text_len, D]`` (None: cross K/V
        cached). The elementwise work between the attention calls is in regions :meth:`compile_regions` compiles."""
        mod = (self.modulation.unsqueeze(0) + e0).chunk(6, dim=2)   # six [B, F, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        # 1. self-attention, modulated and gated per frame: full sequence (optionally masked) or against the cache
        slots = None if plan.call is None else plan.call.write_slots(layer)
        q, k, v = self._self_attn_in(x, shift1, scale1, plan.cos, plan.sin, slots)
        y = attention(q, k, v, plan.mask) if plan.call is None else plan.call.attend(q, k, v, layer)
        # 2. cross-attention to the text (no modulation, no gate)
        x, cq = self._cross_attn_in(x, y, gate1)
        c = self.cross_attn.attend(cq, ctx, plan, layer)
        # 3. feed-forward, modulated and gated per frame
        return self._ffn(x, c, shift2, scale2, gate2)

    @staticmethod
    def _per_frame(t: torch.Tensor, num_frames: int) -> torch.Tensor:  # [B, L, D] -> [B, F, S, D]
        return t.unflatten(1, (num_frames, -1))

    def _self_attn_in(self, x, shift1, scale1, cos, sin, slots=None):
        """q, k, v; with ``slots`` (``CachedCall.write_slots``) k and v are stored there and not returned."""
        h = (self._per_frame(self.norm1(x), shift1.shape[1]) * (1 + scale1) + shift1).flatten(1, 2)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        if slots is None:
            return q, k, v
        slots[0].copy_(k)   # compiled: inductor's own store kernels, cheaper than the eager copies (performance.md)
        slots[1].copy_(v)
        return q, None, None

    def _cross_attn_in(self, x, y, gate1):
        x = x + (self._per_frame(self.self_attn.o(y.flatten(2)), gate1.shape[1]) * gate1).flatten(1, 2)
        return x, self.cross_attn.query(self.norm3(x))

    def _ffn(self, x, c, shift2, scale2, gate2):
        x = x + self.cross_attn.o(c.flatten(2))
        h = (self._per_frame(self.norm2(x), shift2.shape[1]) * (1 + scale2) + shift2).flatten(1, 2)
        return x + (self._per_frame(self.mlp(h), gate2.shape[1]) * gate2).flatten(1, 2)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """``ffn(h)``; on CUDA without autograd the tanh-GELU runs in the first GEMM's epilogue, before rounding to bf16
        (H100: 0.196 vs 0.244 ms at 4,680 tokens; closer to a float64 reference than product-then-GELU)."""
        up, act, down = self.ffn
        if h.is_cuda and not torch.is_grad_enabled() and isinstance(up, nn.Linear):   # not once converted to fp8
            hidden = torch._addmm_activation(up.bias, h.reshape(-1, h.shape[-1]), up.weight.t(), use_gelu=True)
            return down(hidden.view(*h.shape[:-1], -1))
        return down(act(up(h)))

    def compile_regions(self, **options) -> None:
        """``torch.compile`` the three elementwise regions (inference); attention and cache writes stay eager (their
        Python-int positions would specialise graphs)."""
        for name in self.REGIONS:
            setattr(self, name, torch.compile(getattr(type(self), name).__get__(self), **options))


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        out = cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x ``[B, F·S, D]``, e ``[B, F, D]`` (time embedding, no SiLU) -> ``[B, F, S, out·prod(patch)]``."""
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)  # [B, F, 1, D]
        h = self.norm(x).unflatten(1, (e.shape[1], -1))
        return self.head(h * (1 + scale) + shift)


class WanModel(nn.Module):
    """Wan2.1 DiT; ``causal``: full-sequence calls use the block-causal mask. Blocks hold ``num_frame_per_block``
    latent frames (frame 0 alone with ``independent_first_frame``); ``local_attn_size``: attention window in frames
    (-1: everything so far), its first ``sink_size`` frames permanent."""

    def __init__(self, config: WanConfig, causal: bool = False, num_frame_per_block: int = 1,
                 independent_first_frame: bool = False, local_attn_size: int = -1, sink_size: int = 0):
        super().__init__()
        self.config = cfg = config
        self.causal = causal
        self.layout = BlockLayout(num_frame_per_block, independent_first_frame)
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        d = cfg.dim
        # Parameter names match the original Wan2.1 state dict.
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RotaryTables(cfg.head_dim, cfg.rope_max_positions)
        self._masks: dict[tuple, Any] = {}
        self.init_weights()

    @property
    def num_frame_per_block(self) -> int:
        return self.layout.frames_per_block

    def init_weights(self) -> None:
        """Wan's initialisation (model_and_inference.md §2.6); pretrained weights usually replace it."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def compile_blocks(self, **options) -> None:
        """Compile every block's elementwise regions; layers share graphs, so compile time does not grow with depth."""
        options = {"dynamic": False, "fullgraph": True, **options}
        # One cache entry per distinct token count / frame count; streaming uses a handful, long videos no more.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in self.blocks:
            block.compile_regions(**options)
        compile_merge(**options)   # split-KV attention's merge (model/attention.py)

    def fuse_qkv(self) -> None:
        """One q/k/v product per layer (:meth:`SelfAttention.fuse_qkv`); call after ``.to()``, which replaces
        parameters and would undo the sharing."""
        for block in self.blocks:
            block.self_attn.fuse_qkv()

    def uncompile_blocks(self) -> None:
        for block in self.blocks:
            for name in block.REGIONS:
                block.__dict__.pop(name, None)
        compile_merge(False)

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``[B, F, C, H, W]`` -> tokens ``[B, F'·H'·W', D]`` and the grid ``(F', H', W')``."""
        h = self.patch_embedding(x.transpose(1, 2))             # [B, D, F', H', W']
        # Row-major tokens: the residual stream keeps the layout it starts with through every compiled region, and
        # a feature-major one splits each LayerNorm into three kernels (docs/performance.md).
        return h.flatten(2).transpose(1, 2).contiguous(), tuple(h.shape[2:])

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, F', S, pt·ph·pw·C]`` -> ``[B, F'·pt, C, H'·ph, W'·pw]``."""
        pt, ph, pw = self.config.patch_size
        f, hh, ww = grid
        out = out.reshape(out.shape[0], f, hh, ww, pt, ph, pw, self.config.out_dim)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6)                # [B, F', pt, C, H', ph, W', pw]
        # With 1x1 spatial patches the reshape is a view of the head's output; a copy, so that the model never returns
        # a view (FSDP2 hooks an output for backward, and an in-place op on a view would drop that hook).
        return out.reshape(out.shape[0], f * pt, self.config.out_dim, hh * ph, ww * pw).contiguous()

    def _time(self, t: torch.Tensor, num_frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame time embedding ``e [B, F, D]`` and modulation ``e0 [B, F, 6, D]``."""
        t = t.reshape(t.shape[0], -1).expand(-1, num_frames)   # [B] or [B, F] -> [B, F]
        b = t.shape[0]
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), self.config.freq_dim).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, -1))
        return e.view(b, num_frames, -1), e0.view(b, num_frames, 6, -1)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, L, text_dim]`` (L <= text_len) -> ``[B, text_len, D]``; rows are zero-padded BEFORE the MLP."""
        pad = self.config.text_len - context.shape[1]
        if pad < 0:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={self.config.text_len}")
        return self.text_embedding(F.pad(context, (0, 0, 0, pad)))

    @torch.no_grad()
    def fill_cross(self, context: torch.Tensor, cache: KVCache) -> None:
        """The prompt's cross-attention K/V of every layer into ``cache`` ahead of the first call (the same products
        that call would make), so that a CUDA graph can serve a video's first call too."""
        ctx = self.embed_text(context)
        for i, block in enumerate(self.blocks):
            cache.store_cross(i, *block.cross_attn.kv(ctx))

    def _run_blocks(self, x, e0, ctx, plan: AttnPlan) -> torch.Tensor:
        # Activation checkpointing is applied from outside (utils.distributed.apply_activation_checkpointing).
        with kernel_scope(x.device.type):  # the SDPA kernel order, set once per pass
            for i, block in enumerate(self.blocks):
                x = block(x, e0, ctx, plan, i)
        return x

    def _mask(self, kind: str, num_frames: int, tokens_per_frame: int, device: torch.device):
        """Cached mask for (kind, frames, tokens, device): dense on CPU, flex BlockMask on CUDA."""
        key = (kind, num_frames, tokens_per_frame, str(device), self.layout, self.local_attn_size, self.sink_size)
        if key not in self._masks:
            frame_mask = teacher_forcing_frame_mask(num_frames, self.layout) if kind == "teacher_forcing" \
                else block_causal_frame_mask(num_frames, self.layout, self.local_attn_size, self.sink_size)
            realise = flex_block_mask if device.type == "cuda" else dense_token_mask
            self._masks[key] = realise(frame_mask, tokens_per_frame, device)
        return self._masks[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Full-sequence flow ``[B, F, C, H, W]``: x ``[B, F, C, H, W]``, t ``[B]`` or ``[B, F]``, context ``[B, L,
        text_dim]``; bidirectional, or under the block-causal mask (diffusion forcing) for the causal model."""
        tokens, grid = self._patchify(x)
        e, e0 = self._time(t, grid[0], tokens.dtype)
        ctx = self.embed_text(context)
        cos, sin = self.rope.tables(tuple(range(grid[0])), grid[1], grid[2], x.device)
        mask = self._mask("block_causal", grid[0], grid[1] * grid[2], x.device) if self.causal else None
        out = self._run_blocks(tokens, e0, ctx, AttnPlan(cos, sin, mask))
        return self._unpatchify(self.head(out, e), grid)

    def forward_teacher_forcing(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                                clean_x: torch.Tensor, clean_t: torch.Tensor | None = None) -> torch.Tensor:
        """The noisy half's flow of ``[clean_x at clean_t (zeros) ; x at t]``, clean and noisy frame i at position i:
        each noisy block sees itself and the clean blocks before it, K "denoise block b given the clean prefix"
        problems in one pass."""
        if clean_x.shape != x.shape:
            raise ValueError(f"clean_x {tuple(clean_x.shape)} must match x {tuple(x.shape)}")
        noisy, grid = self._patchify(x)
        clean, _ = self._patchify(clean_x)
        num_frames = grid[0]
        t = t.reshape(t.shape[0], -1).expand(-1, num_frames)
        clean_t = torch.zeros_like(t) if clean_t is None else clean_t
        e, e0 = self._time(torch.cat([clean_t, t], dim=1), 2 * num_frames, noisy.dtype)
        ctx = self.embed_text(context)
        cos, sin = self.rope.tables(tuple(range(num_frames)) * 2, grid[1], grid[2], x.device)
        mask = self._mask("teacher_forcing", num_frames, grid[1] * grid[2], x.device)
        out = self._run_blocks(torch.cat([clean, noisy], dim=1), e0, ctx, AttnPlan(cos, sin, mask))
        return self._unpatchify(self.head(out[:, clean.shape[1]:], e[:, num_frames:]), grid)

    def forward_cached(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cache: KVCache,
                       start_frame: int, *, mode: CacheMode | str = CacheMode.INFERENCE,
                       blocks: tuple[int, ...] = (), view: CacheView = FULL) -> torch.Tensor:
        """Frames ``start_frame .. start_frame+n-1`` (x ``[B, n, C, H, W]``, t ``[B]`` or ``[B, n]``) through the KV
        cache, attending to what ``view`` says (default: write, attend to everything cached and the call's own frames
        both ways). ``blocks``: several consecutive blocks in one inference call, each seeing the cache up to its own
        end. Inference under autograd raises (gradients would skip the call's K/V)."""
        mode = CacheMode(mode)
        if mode is CacheMode.INFERENCE and torch.is_grad_enabled():
            raise RuntimeError("forward_cached(mode='inference') under autograd: use torch.no_grad(), or "
                               "mode='rollout' for a step that keeps gradients")
        tokens, grid = self._patchify(x)
        call = cache.begin(start_frame, grid[0], view, mode, tuple(blocks))
        if blocks:
            assert sum(blocks) == grid[0] and call.prefix, "multi-block calls are inference over the full view"
            assert cache.can_fuse(start_frame, grid[0]), "a multi-block call would evict frames it still needs"
        e, e0 = self._time(t, grid[0], tokens.dtype)
        # Cross-attention K/V: recomputed in a rollout step (so gradients reach W_k, W_v), else cached per prompt.
        cross = Cross.CONTEXT if mode is CacheMode.ROLLOUT else Cross.CACHED if cache.cross_ready else Cross.FILL
        ctx = None if cross is Cross.CACHED else self.embed_text(context)
        cos, sin = self.rope.tables(call.positions, grid[1], grid[2], x.device)
        out = self._run_blocks(tokens, e0, ctx, AttnPlan(cos, sin, call=call, cross=cross))
        if view.write:
            cache.advance(start_frame, grid[0])
        return self._unpatchify(self.head(out, e), grid)
