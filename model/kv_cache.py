"""Preallocated key/value cache for streaming generation (keys stored rotated) and the attention of one cached call
against it: docs/architecture.md, "The KV cache" and "Rolling windows"."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import torch

from model.attention import attention
from model.rope import RotaryTables, apply_rope


class CacheMode(str, Enum):
    """How a cached call runs (same values): ``INFERENCE`` without autograd, ``ROLLOUT`` keeping gradients (earlier
    frames' K/V copied out next to the block's own, cross K/V recomputed)."""

    INFERENCE = "inference"
    ROLLOUT = "rollout"


@dataclass(frozen=True)
class CacheView:
    """What one cached call attends to: ``span`` frames in all, sink and own frames included (None: everything
    cached); ``sink``: the sink frames placed just before the oldest other frame (without it they are ordinary
    history); ``write``: store the call's K/V for later calls."""

    span: int | None = None
    sink: bool = True
    write: bool = True

    @property
    def full(self) -> bool:
        return self.span is None and self.sink and self.write


FULL = CacheView()
# Attend to everything cached, store nothing: a video's first block's denoising steps, which see no earlier frame and
# whose K/V the block's context pass writes anyway (one K and one V copy per layer and step saved on the path to the
# first frame).
SCRATCH = CacheView(write=False)

# A prefix call's K/V are stored by the region that makes them (WanBlock._self_attn_in, compiled on CUDA) instead of
# copied in by ``attend``: a frame-wise video's copy kernels 100 -> 16 ms on an H100 (False: the A/B variant).
DIRECT_WRITE = True


class KVCache:
    """Self- and cross-attention cache of one model for one batch of prompts."""

    def __init__(self, num_layers: int, batch_size: int, tokens_per_frame: int, num_heads: int, head_dim: int,
                 capacity_frames: int, sink_frames: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", rope: RotaryTables | None = None):
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_size {sink_frames} must be >= 0 and below the cache size {capacity_frames}")
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity_frames
        self.sink = sink_frames
        self.rope = rope or RotaryTables(head_dim)
        shape = (num_layers, batch_size, capacity_frames * tokens_per_frame, num_heads, head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        # the sink frames' keys as written (rotary positions 0..sink-1); rotated into place when used
        self.sink_k = torch.zeros((num_layers, batch_size, sink_frames * tokens_per_frame, num_heads, head_dim),
                                  dtype=dtype, device=device)
        self._cross_memory: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.reset()

    @classmethod
    def for_model(cls, model, batch_size: int, height: int, width: int, capacity_frames: int,
                  sink_frames: int = 0, dtype=None, device=None) -> "KVCache":
        """A cache sized from ``model.config`` and the latent ``height`` x ``width``, positioned by ``model.rope``."""
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_layers, batch_size, cfg.tokens_per_frame(height, width), cfg.num_heads, cfg.head_dim,
                   capacity_frames, sink_frames, dtype or p.dtype, device or p.device, model.rope)

    def reset(self) -> None:
        """Forget every frame and the prompt (buffers are reused; stale values are never read)."""
        self.frames_written = 0   # one past the highest frame written so far
        self.origin = 0           # the frame at rotary position 0
        self.placed = [0] * self.num_layers   # rotation (frames) of the sink keys now in each layer's sink slots
        self.reset_cross()

    def reset_cross(self) -> None:
        """Forget the prompt's cross-attention K/V (a new prompt refills them on the next call). Per layer
        ``[B, text_len, N, d]`` once filled; each block fills its own entry inside its forward, so a block sharded on
        its own (FSDP2) only ever touches its own weights."""
        self.cross_k: list[torch.Tensor | None] = [None] * self.num_layers
        self.cross_v: list[torch.Tensor | None] = [None] * self.num_layers

    def store_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a prompt's cross-attention K/V of ``layer``, in the memory of the previous prompt's when the shapes
        agree: a CUDA graph that reads them (pipeline/graphs.py) reads them there."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        old = self._cross_memory[layer]
        if old is not None and old[0].shape == k.shape and old[1].shape == v.shape:
            k, v = old[0].copy_(k), old[1].copy_(v)
        self._cross_memory[layer] = (k, v)
        self.cross_k[layer], self.cross_v[layer] = k, v
        return k, v

    def free(self) -> None:
        """Release every buffer now (a stopped stream must not hold GPU memory); the cache is unusable after."""
        self.k = self.v = self.sink_k = torch.empty(0)
        self.reset_cross()
        self._cross_memory = [None] * self.num_layers

    def skip_to(self, frame: int) -> None:
        """Continue at ``frame`` after a reset, frames ``sink..frame-1`` left out (re-encoding only the frames a
        window still holds)."""
        if frame < self.frames_written:
            raise ValueError(f"cannot skip back to frame {frame}: {self.frames_written} frames are cached")
        self.frames_written = frame

    @property
    def cross_ready(self) -> bool:
        return all(k is not None for k in self.cross_k)

    @property
    def ring(self) -> int:
        return self.capacity - self.sink

    def slot(self, frame: int) -> int:
        return frame if frame < self.sink else self.sink + (frame - self.sink) % self.ring

    def check_positions(self, call_frames: int) -> None:
        """Raise unless calls of ``call_frames`` frames can run forever: after a re-base the window and the call
        must fit the RoPE table. Streams check this before their first block."""
        if self.capacity + call_frames > self.rope.max_positions:
            raise ValueError(f"an attention window of {self.capacity} frames plus calls of {call_frames} frames "
                             f"exceed the {self.rope.max_positions} RoPE positions: use a window of at most "
                             f"{self.rope.max_positions - call_frames} frames (local_attn_size)")

    def token_ranges(self, frames: range) -> list[tuple[int, int]]:
        """Contiguous token ranges ``[(start, end), ...]`` of the slots holding ``frames``."""
        ranges: list[tuple[int, int]] = []
        s = self.tokens_per_frame
        for f in frames:
            a = self.slot(f) * s
            if ranges and ranges[-1][1] == a:
                ranges[-1] = (ranges[-1][0], a + s)
            else:
                ranges.append((a, a + s))
        return ranges

    def can_fuse(self, start_frame: int, num_frames: int) -> bool:
        """Whether frames ``start_frame..start_frame+num_frames-1`` can be written in one call without evicting a
        frame that an earlier block of the same call still attends to (true until the window is full)."""
        return start_frame + num_frames <= self.capacity

    def advance(self, start_frame: int, num_frames: int) -> None:
        self.frames_written = max(self.frames_written, start_frame + num_frames)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.sink_k.nbytes

    def begin(self, start_frame: int, num_frames: int, view: CacheView = FULL,
              mode: CacheMode = CacheMode.INFERENCE, blocks: tuple[int, ...] = ()) -> "CachedCall":
        """Check and position a call over frames ``start_frame..start_frame+num_frames-1`` (re-basing first when it
        would pass the RoPE table) and work out what it attends to."""
        block = max(blocks) if blocks else num_frames
        if view.write and block > self.ring:   # a call that is not stored may be longer than the ring
            raise ValueError(f"a block of {block} frames does not fit a cache window of {self.capacity} "
                             f"frames with {self.sink} sink frames")
        if start_frame > self.frames_written:
            raise ValueError(f"block starts at frame {start_frame} but only {self.frames_written} frames are cached")
        end = start_frame + num_frames
        if end - self.origin > self.rope.max_positions:
            self._rebase(end)
        span = self.capacity if view.span is None else view.span
        if view.sink:
            sinks = min(self.sink, start_frame)
            first = max(self.sink, end - span + sinks)
        else:
            sinks, first = 0, max(0, end - span)
        first = min(first, start_frame)
        high = max(self.frames_written, end if view.write else 0)
        assert first >= start_frame or max(first, self.sink) >= high - self.ring, "a view reaches evicted frames"
        return CachedCall(self, start_frame, num_frames, view, mode, tuple(blocks), sinks, first)

    def _rebase(self, end: int) -> None:
        """Move every position back so the oldest ring frame sits right after the sink (module docstring)."""
        oldest = max(self.sink, self.frames_written - self.ring)
        delta = oldest - self.sink - self.origin
        if delta <= 0 or end - self.origin - delta > self.rope.max_positions:
            raise ValueError(f"frames up to {end} do not fit the {self.rope.max_positions} RoPE positions with a "
                             f"{self.capacity}-frame window (check_positions)")
        cos, sin = self.rope.frame_rotation(-delta, self.k.device)
        ring = slice(self.sink * self.tokens_per_frame, None)
        for layer in range(self.num_layers):  # one layer at a time: the rotation's float32 temporaries stay small
            self.k[layer, :, ring] = apply_rope(self.k[layer, :, ring], cos, sin)
        self.origin += delta

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a call's (rotated) keys and values ``[B, n·S, N, d]`` in its frames' slots (values, not graphs)."""
        offset = 0
        for a, b in self.token_ranges(range(start_frame, start_frame + k.shape[1] // self.tokens_per_frame)):
            self.k[layer, :, a:b].copy_(k[:, offset:offset + b - a].detach())
            self.v[layer, :, a:b].copy_(v[:, offset:offset + b - a].detach())
            offset += b - a
        if start_frame < self.sink:   # also kept as written, to be rotated into place later
            assert self.origin == 0 and self.placed[layer] == 0, "sink frames are written before any re-base"
            s = self.tokens_per_frame
            a, b = start_frame * s, min(self.sink * s, start_frame * s + offset)
            self.sink_k[layer, :, a:b].copy_(k[:, :b - a].detach())

    def sink_keys(self, layer: int, frames: range, shift: int) -> torch.Tensor:
        """Keys of sink ``frames`` moved by ``shift`` frames from their own positions."""
        s = self.tokens_per_frame
        k = self.sink_k[layer, :, frames.start * s:frames.stop * s]
        return k if shift == 0 else apply_rope(k, *self.rope.frame_rotation(shift, k.device))

    def place_sink(self, layer: int, shift: int) -> None:
        """Put the sink keys into their slots moved by ``shift`` frames (the prefix path reads them there)."""
        if self.placed[layer] != shift:
            self.k[layer, :, :self.sink * self.tokens_per_frame] = self.sink_keys(layer, range(self.sink), shift)
            self.placed[layer] = shift


@dataclass
class CachedCall:
    """One cached forward's positions and attention set (Python ints, shared by all layers of the call)."""

    cache: KVCache
    start_frame: int
    num_frames: int
    view: CacheView
    mode: CacheMode
    blocks: tuple[int, ...]   # sizes of consecutive blocks carried by one call (prefix path); () = one
    sinks: int                # sink frames attended, placed before ``first``
    first: int                # first earlier frame attended (== start_frame: none)

    @property
    def positions(self) -> tuple[int, ...]:
        """Rotary frame positions of the call's own frames."""
        o = self.cache.origin
        return tuple(range(self.start_frame - o, self.start_frame + self.num_frames - o))

    @property
    def prefix(self) -> bool:
        """Inference over everything the cache holds: write, then attend to a prefix of the buffer (no copy)."""
        return self.mode is CacheMode.INFERENCE and self.view.full

    @property
    def sink_shift(self) -> int:
        return self.first - self.sinks - self.cache.origin

    def write_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cache views ``[B, n·S, N, d]`` that this call's K/V at ``layer`` go to, for the projections to write
        them there (:data:`DIRECT_WRITE`): prefix calls whose frames take one contiguous range of slots and keep no
        sink copy; None otherwise (:meth:`attend` writes them)."""
        if self._slot_range is None:
            return None
        a, b = self._slot_range
        return self.cache.k[layer, :, a:b], self.cache.v[layer, :, a:b]

    @cached_property
    def _slot_range(self) -> tuple[int, int] | None:
        """The token range of :meth:`write_slots` (the same for every layer of the call), or None."""
        if not (DIRECT_WRITE and self.prefix and self.start_frame >= self.cache.sink):
            return None
        ranges = self.cache.token_ranges(range(self.start_frame, self.start_frame + self.num_frames))
        return ranges[0] if len(ranges) == 1 else None

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: int) -> torch.Tensor:
        """Self-attention of the call's queries ``[B, L, N, d]`` at ``layer``; writes its K/V if the view says so.
        ``k``, ``v`` None: already written to :meth:`write_slots`."""
        cache = self.cache
        if k is None:
            assert self.prefix, "only prefix calls read their own K/V from the cache"
        elif self.view.write:
            cache.write(layer, self.start_frame, k, v)
        if self.prefix:
            return self._attend_prefix(q, layer)
        # Gathered: the attended cache entries are copied next to the call's own K/V, through which alone
        # gradients flow (later in-place cache writes cannot corrupt what backward needs).
        keys, values = self._gather(layer)
        if not keys:   # nothing earlier is attended: the call's own K/V, not a copy of them
            return attention(q, k, v)
        return attention(q, torch.cat(keys + [k], dim=1), torch.cat(values + [v], dim=1))

    def _attend_prefix(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        """Each block's queries see the cache up to the end of their own block (block-causal)."""
        cache, s = self.cache, self.cache.tokens_per_frame
        if self.sinks:
            cache.place_sink(layer, self.sink_shift)
        outs, q0, end = [], 0, self.start_frame
        for n in self.blocks or (self.num_frames,):
            end += n
            visible = min(end, cache.capacity) * s   # the slots holding valid frames: a prefix of the buffer
            outs.append(attention(q[:, q0:q0 + n * s], cache.k[layer, :, :visible], cache.v[layer, :, :visible]))
            q0 += n * s
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _gather(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K/V of the attended cache entries: placed sink, sink frames at their own positions, ring frames."""
        cache, s = self.cache, self.cache.tokens_per_frame
        keys, values = [], []
        if self.sinks:
            keys.append(cache.sink_keys(layer, range(self.sinks), self.sink_shift))
            values.append(cache.v[layer, :, :self.sinks * s])
        own = range(self.first, min(cache.sink, self.start_frame))   # without the sink view: plain history
        if len(own):
            keys.append(cache.sink_keys(layer, own, -cache.origin))
            values.append(cache.v[layer, :, own.start * s:own.stop * s])
        for a, b in cache.token_ranges(range(max(self.first, cache.sink), self.start_frame)):
            keys.append(cache.k[layer, :, a:b])
            values.append(cache.v[layer, :, a:b])
        return keys, values
