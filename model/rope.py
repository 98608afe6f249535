"""3-axis rotary position embedding of Wan2.1 (model_and_inference.md §2.5, §3.3).

The head size ``d`` is ``d/2`` pairs of ADJACENT elements ``(x[2j], x[2j+1])``, split ``[c - 2*(c//3), c//3, c//3]``
(c = d/2) between the frame, row and column axes, each with the table ``pos * 10000^(-2j/n_a)`` (``n_a`` = twice its
pair count). The reference rotates in float64 complex arithmetic; here float64 angles become float32 cos/sin tables
and the rotation is real float32 arithmetic (~1e-7 relative difference; cheap, compiles cleanly)."""

from __future__ import annotations

import torch

THETA = 10000.0


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs given to the (frame, row, column) axes."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(pairs: int) -> torch.Tensor:
    """float64 angular frequencies ``[pairs]`` of one axis."""
    n = 2 * pairs
    return 1.0 / (THETA ** (torch.arange(0, n, 2, dtype=torch.float64) / n))


class RotaryTables:
    """Per-axis angle tables plus a small cache of per-call ``(cos, sin)`` token tables."""

    def __init__(self, head_dim: int, max_positions: int = 1024):
        self.head_dim = head_dim
        self.max_positions = max_positions
        positions = torch.arange(max_positions, dtype=torch.float64)
        self.angles = [torch.outer(positions, _inv_freq(p)) for p in axis_pairs(head_dim)]   # per axis, float64
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shifts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, frame_positions: tuple[int, ...], height: int, width: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin ``[len(frames)·height·width, head_dim/2]``, token order (f, h, w), for absolute frame
        positions (Python integers: nothing reads the GPU; teacher forcing repeats 0..F-1 for its two halves)."""
        key = (frame_positions, height, width, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if max(frame_positions) >= self.max_positions or max(height, width) > self.max_positions:
            raise ValueError(f"RoPE supports {self.max_positions} positions per axis; got frame "
                             f"{max(frame_positions)}, grid {height}x{width}")
        fa, ha, wa = self.angles
        f = fa[list(frame_positions)]                         # [F, cf]
        num_frames = f.shape[0]
        angles = torch.cat([
            f[:, None, None, :].expand(num_frames, height, width, -1),
            ha[:height][None, :, None, :].expand(num_frames, height, width, -1),
            wa[:width][None, None, :, :].expand(num_frames, height, width, -1),
        ], dim=-1).reshape(num_frames * height * width, -1)   # [L, d/2] float64
        out = (angles.cos().float().to(device), angles.sin().float().to(device))
        if len(self._cache) > 256:  # positions of a long stream; keep memory bounded
            self._cache.clear()
        self._cache[key] = out
        return out

    def frame_rotation(self, delta: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[1, head_dim/2]`` moving rotated keys by ``delta`` frames (any integer; how the KV cache re-bases
        and places its sink): ``apply_rope(k_p, *frame_rotation(d))`` is ``k`` rotated at ``p + d``, as rotations
        compose by adding angles. Computed in float64, not looked up, so negative offsets work too."""
        key = (delta, str(device))
        hit = self._shifts.get(key)
        if hit is None:
            pf, ph, pw = axis_pairs(self.head_dim)
            angles = torch.cat([delta * _inv_freq(pf), torch.zeros(ph + pw, dtype=torch.float64)])[None]
            hit = (angles.cos().float().to(device), angles.sin().float().to(device))
            if len(self._shifts) > 256:  # offsets of a long stream; keep memory bounded
                self._shifts.clear()
            self._shifts[key] = hit
        return hit


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x [B, L, N, d]`` by ``cos``/``sin`` ``[L, d/2]``, in float32, returned in ``x``'s
    dtype: ``(x0, x1) -> (x0·c - x1·s, x1·c + x0·s)``, written as ``x·c + swap(x)·(-s, s)``: the partner element is
    an index swap, not a branch per pair element (which inductor compiled into one masked load per element and
    branch: docs/performance.md)."""
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))                    # [B, L, N, d/2, 2]
    c = cos[None, :, None, :, None]
    s = torch.stack((-sin, sin), dim=-1)[None, :, None]      # [1, L, 1, d/2, 2]
    return (xf * c + xf.flip(-1) * s).flatten(-2).to(dtype)
