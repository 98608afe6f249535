"""Classifier-free guidance, written once: both halves as one ``2B`` batch (:func:`cond_uncond_context`), combined by
:func:`guide`; the DMD configs' ``cond + g·(cond − uncond)`` is ``s = g + 1`` (that caller converts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale·(cond − uncond)`` (flows or x0 predictions alike: the combination is linear)."""
    return uncond + scale * (cond - uncond)


def cond_uncond_context(context: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """``[context ; negative]`` as one ``[2B, L, D]`` batch: ``negative`` (batch 1 or B) is expanded to B, and the
    shorter of the two is zero-padded to the longer one's length, as the model pads both to ``text_len`` anyway."""
    length = max(context.shape[1], negative.shape[1])
    pad = lambda c: F.pad(c, (0, 0, 0, length - c.shape[1]))  # noqa: E731
    return torch.cat([pad(context), pad(negative.expand(context.shape[0], -1, -1))])
