"""Preallocated key/value cache for streaming generation (model_and_inference.md §5).

One object per model and prompt: self-attention K/V of every layer (keys already rotated to their absolute
positions) and the cross-attention K/V of the prompt.

Slots are frames. With a window of ``capacity`` frames of which the first ``sink`` are permanent, frame ``f`` lives
in slot ``f`` while ``f < sink`` and in slot ``sink + (f - sink) mod (capacity - sink)`` after that: a ring over the
non-sink slots. Before the ring wraps this is slot ``f``, so a cache that holds the whole video is a plain array.
After writing a block that ends at frame ``e`` the cache holds the sink frames plus the ``capacity - sink`` frames
ending at ``e`` -- exactly the reference's shift-left eviction, without moving any memory. Attention needs no mask:
keys carry their positions, and softmax does not care about slot order.

Every position here is a Python integer derived from the block schedule, so the per-block step never reads the GPU
and can be captured by CUDA graphs.
"""

from __future__ import annotations

import torch


class KVCache:
    """Self- and cross-attention cache of one model for one batch of prompts."""

    def __init__(self, num_layers: int, batch_size: int, tokens_per_frame: int, num_heads: int, head_dim: int,
                 capacity_frames: int, sink_frames: int = 0, text_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_size {sink_frames} must be >= 0 and below the cache size {capacity_frames}")
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity_frames
        self.sink = sink_frames
        shape = (num_layers, batch_size, capacity_frames * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # per layer [B, text_len, N, d] once filled; each block fills its own entry inside its forward, so a block
        # sharded on its own (FSDP2) only ever touches its own weights
        self.cross_k: list[torch.Tensor | None] = [None] * num_layers
        self.cross_v: list[torch.Tensor | None] = [None] * num_layers
        self.text_len = text_len
        self.frames_written = 0   # one past the highest frame written so far

    @classmethod
    def for_model(cls, model, batch_size: int, height: int, width: int, capacity_frames: int,
                  sink_frames: int = 0, dtype=None, device=None) -> "KVCache":
        """A cache sized from ``model.config`` and the latent ``height`` x ``width``."""
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_layers, batch_size, cfg.tokens_per_frame(height, width), cfg.num_heads, cfg.head_dim,
                   capacity_frames, sink_frames, cfg.text_len, dtype or p.dtype, device or p.device)

    # ----------------------------------------------------------------------------------------------------------
    # bookkeeping (Python integers only)

    def reset(self, keep_cross: bool = False) -> None:
        """Forget every frame (buffers are reused; stale values are never read)."""
        self.frames_written = 0
        if not keep_cross:
            self.reset_cross()

    def reset_cross(self) -> None:
        """Forget the prompt's cross-attention K/V (a new prompt refills them on the next call)."""
        self.cross_k = [None] * self.num_layers
        self.cross_v = [None] * self.num_layers

    @property
    def cross_ready(self) -> bool:
        return all(k is not None for k in self.cross_k)

    @property
    def ring(self) -> int:
        return self.capacity - self.sink

    def slot(self, frame: int) -> int:
        return frame if frame < self.sink else self.sink + (frame - self.sink) % self.ring

    def check_block(self, start_frame: int, num_frames: int) -> None:
        if num_frames > self.ring:
            raise ValueError(f"a block of {num_frames} frames does not fit a cache window of {self.capacity} "
                             f"frames with {self.sink} sink frames")
        if start_frame > self.frames_written:
            raise ValueError(f"block starts at frame {start_frame} but only {self.frames_written} frames are cached")

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

    def visible_frames(self, end_frame: int) -> int:
        """Slots holding valid frames once everything before ``end_frame`` is written (a prefix of the buffer)."""
        return min(end_frame, self.capacity)

    def other_ranges(self, start_frame: int, num_frames: int) -> list[tuple[int, int]]:
        """Token ranges a block sees besides its own slots: the sink and recent frames before it."""
        end = start_frame + num_frames
        first_recent = max(self.sink, end - self.ring)
        frames = list(range(min(self.sink, start_frame))) + list(range(first_recent, start_frame))
        return self.token_ranges(frames)  # type: ignore[arg-type]

    def can_fuse(self, start_frame: int, num_frames: int) -> bool:
        """Whether frames ``start_frame..start_frame+num_frames-1`` can be written in one call without evicting a
        frame that an earlier block of the same call still attends to (true until the window is full)."""
        return start_frame + num_frames <= self.capacity

    def advance(self, start_frame: int, num_frames: int) -> None:
        self.frames_written = max(self.frames_written, start_frame + num_frames)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
