"""The arithmetic of diffusers' ``AutoencoderKLWan`` decoder, one step at a time (:func:`decoder_step`), with its
causal cache as plain tensors: each causal convolution sees ``cat(cache, x)`` in time, the cache holding the last
``kernel_t - 1`` frames of its input (zeros at a video's start, diffusers' padding). diffusers' own cache list carries
None / "Rep" markers, a new graph per marker state under torch.compile. The regions (:class:`DecoderRegions`) are
compiled one by one, not as one graph (why: docs/architecture.md, "Compiled VAE decoder regions")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F


def _causal_conv(conv: nn.Conv3d, x: torch.Tensor, cache: torch.Tensor | None):
    """A ``WanCausalConv3d`` with time from ``cache`` (None: zeros); returns ``(output, new cache)``."""
    keep = conv._padding[4]  # the causal padding: kernel_t - 1 frames
    weight, bias = conv.weight, conv.bias
    pad_w, _, pad_h = conv._padding[:3]
    if cache is None and keep and x.shape[2] == 1:
        # a video's first call (one frame): the frames before it are zeros, so only the last time tap counts, a
        # 2-D convolution of the frame (a third of the products for kernel_t 3; as conv3d over a one-frame
        # channels-last tensor, cuDNN converted layouts first)
        new_cache = torch.cat([_zero_frames(x, keep - 1), x], dim=2)   # the last keep frames of zeros + x
        layout = torch.channels_last if _layout(x) is torch.channels_last_3d else torch.contiguous_format
        frame = x[:, :, 0].contiguous(memory_format=layout)
        out = F.conv2d(frame, weight[:, :, keep].contiguous(memory_format=layout), bias, conv.stride[1:],
                       (pad_h, pad_w)).unsqueeze(2)
    else:
        x = torch.cat([_zero_frames(x, keep) if cache is None else cache, x], dim=2)
        new_cache = x[:, :, x.shape[2] - keep :].clone()
        # height/width padding inside the convolution: no padded copy (H100: 0.81 vs 0.87 s compiled per 81 frames)
        out = F.conv3d(x, weight.contiguous(memory_format=_layout(x)), bias, conv.stride, (0, pad_h, pad_w))
    return out, new_cache


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def _canonical(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``x`` dense in ``layout`` with the layout's own strides, also on size-1 dimensions: compiled regions guard on
    strides, and a size-1 dimension otherwise keeps its producer's stride (one graph per producer)."""
    x = x.contiguous(memory_format=layout)
    return x.as_strided(x.shape, torch.empty(x.shape, device="meta", memory_format=layout).stride())


def _own(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` in a buffer of its own: compiled, a region returns it as a view into the convolution's whole input
    (inductor drops the clone), which kept 5.1 instead of 2.4 GiB alive on the H100; the copy costs ~1 ms."""
    return cache if cache.untyped_storage().nbytes() == cache.nbytes else cache.clone()


def _zero_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Zeros of ``frames`` time steps, shaped and laid out like ``x``."""
    b, c, _, h, w = x.shape
    return torch.zeros((b, c, frames, h, w), dtype=x.dtype, device=x.device).contiguous(memory_format=_layout(x))


def _residual(block: nn.Module, x: torch.Tensor, cache1: torch.Tensor | None, cache2: torch.Tensor | None):
    """diffusers' ``WanResidualBlock``; returns ``(output, new cache of conv1, of conv2)``."""
    shortcut = x if isinstance(block.conv_shortcut, nn.Identity) \
        else F.conv3d(x, block.conv_shortcut.weight, block.conv_shortcut.bias)   # 1x1x1: no temporal context
    h, new1 = _causal_conv(block.conv1, block.nonlinearity(block.norm1(x)), cache1)
    h, new2 = _causal_conv(block.conv2, block.dropout(block.nonlinearity(block.norm2(h))), cache2)
    return h + shortcut, new1, new2


def _upsample(resample: nn.Module, x: torch.Tensor, cache: torch.Tensor | None, first: bool):
    """diffusers' ``WanResample`` in its up-sampling modes; returns ``(output, new cache)``, the cache None for
    the 2-D mode. The 3-D mode's temporal convolution is skipped on a video's first call (its cache stays zeros)."""
    new = None
    if resample.mode == "upsample3d":
        b, c, t, h, w = x.shape
        if first:
            new = _zero_frames(x, resample.time_conv._padding[4])
        else:  # the convolution doubles the channels; the two halves become consecutive frames
            x, new = _causal_conv(resample.time_conv, x, cache)
            x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
    elif resample.mode != "upsample2d":
        raise ValueError(f"a decoder resampler must up-sample, got mode {resample.mode!r}")
    b, c, t, h, w = x.shape
    layout = _layout(x)
    out = resample.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # nearest 2x, then a 3x3 conv
    # laid out as the input (channels-last: already so, as the 2-D convolution is channels-last too), so that the
    # blocks after it see the strides every other block sees
    return out.view(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4).contiguous(memory_format=layout), new


def _head(decoder: nn.Module, x: torch.Tensor, cache: torch.Tensor | None):
    return _causal_conv(decoder.conv_out, decoder.nonlinearity(decoder.norm_out(x)), cache)


@dataclass(frozen=True)
class DecoderRegions:
    """The functions :func:`decoder_step` runs the decoder with: these, or compiled forms of them."""

    residual: Callable = _residual
    upsample: Callable = _upsample
    head: Callable = _head

    def compiled(self, **options) -> DecoderRegions:
        """Static shapes, whole graphs; blocks of equal shapes share one graph (parameters are graph inputs)."""
        options = {"fullgraph": True, "dynamic": False, **options}
        return DecoderRegions(*(torch.compile(getattr(self, f.name), **options) for f in fields(self)))


EAGER_REGIONS = DecoderRegions()


def decoder_step(decoder: nn.Module, x: torch.Tensor, cache: list[torch.Tensor] | None,
                 regions: DecoderRegions = EAGER_REGIONS, layout: torch.memory_format = torch.contiguous_format):
    """One call of diffusers' ``WanDecoder3d`` with the causal cache as explicit tensors.

    ``x``: ``[B, C, f, h, w]`` after ``post_quant_conv``, one frame when ``cache`` is None (a video's first call);
    ``cache``: the previous call's list, consumed (entries released as used); ``layout``: the activations' memory
    format. Returns ``(pixels [B, 3, T, H, W] unclamped, new cache)``, T = 1 for the first call, 4f after it."""
    first = cache is None
    if first and x.shape[2] != 1:
        raise ValueError(f"the first decoder call of a video takes one latent frame, got {x.shape[2]}")
    new: list[torch.Tensor] = []
    slots = iter(range(len(cache))) if cache is not None else None

    def cached() -> torch.Tensor | None:
        """The next slot's old cache, released as taken: old and new caches never coexist (1.8 GiB at full size)."""
        if cache is None:
            return None
        slot = next(slots)
        old, cache[slot] = cache[slot], None
        return _canonical(old, layout)

    def residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x, *caches = regions.residual(block, _canonical(x, layout), cached(), cached())
        new.extend(map(_own, caches))
        return x

    x, conv_in_cache = _causal_conv(decoder.conv_in, x, cached())  # 16 channels in: nothing to fuse
    new.append(conv_in_cache)
    mid = decoder.mid_block
    x = residual(mid.resnets[0], x)
    for attention, block in zip(mid.attentions, mid.resnets[1:]):
        x = residual(block, attention(x))
    for up in decoder.up_blocks:
        for block in up.resnets:
            x = residual(block, x)
        if up.upsamplers is not None:
            resample = up.upsamplers[0]
            x, upsample_cache = regions.upsample(resample, _canonical(x, layout),
                                                 cached() if resample.mode == "upsample3d" else None, first)
            if upsample_cache is not None:
                new.append(_own(upsample_cache))
    x, head_cache = regions.head(decoder, _canonical(x, layout), cached())
    new.append(_own(head_cache))
    return x, new
