"""Attention mask rules (model_and_inference.md §4) as boolean ``[F_q, F_k]`` frame masks, realised as a dense token
mask (SDPA: CPU training, where flex-attention has no backward) or a flex-attention ``BlockMask`` (GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """How latent frames group into autoregressive blocks (frame 0 alone with ``independent_first_frame``)."""

    frames_per_block: int = 1
    independent_first_frame: bool = False

    def block_index(self, frames: torch.Tensor) -> torch.Tensor:
        """Block index of each frame index in ``frames`` (integer tensor)."""
        n = self.frames_per_block
        if self.independent_first_frame:
            return torch.where(frames == 0, torch.zeros_like(frames), (frames - 1) // n + 1)
        return frames // n

    def block_end(self, frames: torch.Tensor) -> torch.Tensor:
        """Exclusive end frame of the block containing each frame."""
        n = self.frames_per_block
        b = self.block_index(frames)
        if self.independent_first_frame:
            return torch.where(b == 0, torch.ones_like(b), 1 + b * n)
        return (b + 1) * n

    def block_size(self, index: int) -> int:
        """Frames of block ``index``."""
        return 1 if self.independent_first_frame and index == 0 else self.frames_per_block

    def block_starting_at(self, frame: int) -> int:
        """Index of the block that starts at ``frame``; raises ValueError if no block starts there."""
        head = 1 if self.independent_first_frame else 0
        if frame < head:
            return 0
        if (frame - head) % self.frames_per_block:
            raise ValueError(f"frame {frame} is not a block boundary")
        return head + (frame - head) // self.frames_per_block

    def tiles(self, num_frames: int) -> bool:
        """Whether blocks tile a video of ``num_frames`` frames exactly."""
        head = 1 if self.independent_first_frame else 0
        return num_frames >= head and (num_frames - head) % self.frames_per_block == 0

    def block_sizes(self, num_frames: int) -> list[int]:
        """Frames per block for a video of ``num_frames`` frames; raises ValueError if they do not tile it."""
        n = self.frames_per_block
        head = 1 if self.independent_first_frame else 0
        if not self.tiles(num_frames):
            what = f"{num_frames} - 1" if head else str(num_frames)
            raise ValueError(f"{what} latent frames are not a multiple of num_frame_per_block={n}")
        return [1] * head + [n] * ((num_frames - head) // n)


def block_causal_frame_mask(num_frames: int, layout: BlockLayout, local_attn_size: int = -1,
                            sink_size: int = 0) -> torch.Tensor:
    """``[F, F]`` rule: a frame sees every frame of its own and earlier blocks; with a window of ``local_attn_size``
    frames, only the ``sink_size`` first frames and the ``local_attn_size - sink_size`` frames ending at its block's end
    (what the KV cache keeps). The cache also moves the sink frames next to a slid window; one full-sequence pass
    cannot (a key has one position for all queries), so here they keep their own positions."""
    q = torch.arange(num_frames)[:, None]
    k = torch.arange(num_frames)[None, :]
    end = layout.block_end(q)
    allowed = k < end
    if local_attn_size > 0:
        allowed &= (k >= end - (local_attn_size - sink_size)) | (k < sink_size)
    return allowed


def teacher_forcing_frame_mask(num_frames: int, layout: BlockLayout) -> torch.Tensor:
    """``[2F, 2F]`` rule for ``[clean frames ; noisy frames]`` (model_and_inference.md §4.2): clean frames are
    block-causal among themselves; a noisy frame of block ``b`` sees its noisy block and the clean blocks before it."""
    idx = torch.arange(2 * num_frames)
    noisy = idx >= num_frames
    block = layout.block_index(idx % num_frames)
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = block[:, None], block[None, :]
    clean_q = ~qn & ~kn & (kb <= qb)
    noisy_q = qn & ((kn & (kb == qb)) | (~kn & (kb < qb)))
    return clean_q | noisy_q


def dense_token_mask(frame_mask: torch.Tensor, tokens_per_frame: int, device=None) -> torch.Tensor:
    """Expand a frame mask to a boolean token mask ``[F_q·S, F_k·S]`` (True = may attend)."""
    m = frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
    return m.to(device) if device is not None else m


FLEX_BLOCK = 128  # flex-attention tile; sequences are padded to a multiple of it


def padded_length(num_tokens: int) -> int:
    return -(-num_tokens // FLEX_BLOCK) * FLEX_BLOCK


def flex_block_mask(frame_mask: torch.Tensor, tokens_per_frame: int, device, compile_mask: bool = True):
    """A flex-attention ``BlockMask`` for the frame rule over the length padded to a multiple of 128; padded
    positions see only themselves (kept finite, rows discarded) and are never seen."""
    from torch.nn.attention.flex_attention import create_block_mask

    frames = frame_mask.to(device)
    num_frames_q, num_frames_k = frames.shape
    t_q, t_k = num_frames_q * tokens_per_frame, num_frames_k * tokens_per_frame
    s = tokens_per_frame

    def mask_mod(b, h, q_idx, kv_idx):
        qf = torch.clamp(q_idx // s, max=num_frames_q - 1)
        kf = torch.clamp(kv_idx // s, max=num_frames_k - 1)
        real = (q_idx < t_q) & (kv_idx < t_k)
        return (real & frames[qf, kf]) | (q_idx == kv_idx)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=padded_length(t_q), KV_LEN=padded_length(t_k),
                             device=device, _compile=compile_mask)
