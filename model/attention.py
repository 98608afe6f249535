"""The one attention entry point.

``attention(q, k, v, mask)`` takes ``[B, L, N, d]`` tensors and dispatches on the mask it is given:

* ``None`` (bidirectional self-attention, cross-attention, cached streaming attention): flash-attn when it is
  importable and selected, else PyTorch SDPA. On CUDA, SDPA is asked for cuDNN attention first: on the H100 it is
  1.6-1.8x PyTorch's own flash kernel at our shapes (libraries.md §9).
* a dense boolean ``[Lq, Lk]`` mask (True = attend): SDPA. This is the CPU path for training masks.
* a flex-attention ``BlockMask``: compiled ``flex_attention`` over the length padded to a multiple of 128.

The backend is chosen once per process with :func:`set_backend` ("auto", "sdpa", "flash_attn") and can be read back
with :func:`get_backend`; "auto" picks flash-attn on CUDA when it is installed, else SDPA.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
import torch.nn.functional as F

from model.masks import padded_length

log = logging.getLogger(__name__)

_BACKENDS = ("auto", "sdpa", "flash_attn")
_state = {"backend": "auto", "sdpa_order": None}
_flash_fn = None
_compiled_flex = None


def _load_flash():
    """flash-attn 3 (``flash_attn_interface``) or 2 (``flash_attn``), or None."""
    global _flash_fn
    if _flash_fn is None:
        _flash_fn = False
        for module, name in (("flash_attn_interface", "flash_attn_func"), ("flash_attn", "flash_attn_func")):
            try:
                mod = __import__(module, fromlist=[name])
                _flash_fn = getattr(mod, name)
                log.info("attention: using %s.%s", module, name)
                break
            except ImportError:
                continue
    return _flash_fn or None


def set_backend(name: str) -> None:
    """Select the unmasked-attention backend: "auto", "sdpa" or "flash_attn"."""
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {name!r}")
    if name == "flash_attn" and _load_flash() is None:
        raise ValueError("attention backend 'flash_attn' selected but flash-attn is not installed "
                         "(pip install -e .[flash])")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


def set_sdpa_priority(order) -> None:
    """Override the CUDA SDPA kernel order (a list of ``SDPBackend``); None restores cuDNN-first."""
    _state["sdpa_order"] = list(order) if order is not None else None


def _use_flash(q: torch.Tensor) -> bool:
    backend = _state["backend"]
    if backend == "sdpa" or q.device.type != "cuda":
        return False
    return _load_flash() is not None


def _sdpa_context(device_type: str):
    """Prefer cuDNN attention on CUDA; elsewhere PyTorch's default choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device_type != "cuda":
        return contextlib.nullcontext()
    order = _state["sdpa_order"] or [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                     SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order)


def _flex(q, k, v, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # Compiled once per process: eager flex-attention materialises the scores and is only a reference path.
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    lq, lk = q.shape[1], k.shape[1]
    pq, pk = padded_length(lq) - lq, padded_length(lk) - lk
    qt, kt, vt = (F.pad(t, (0, 0, 0, 0, 0, p)).transpose(1, 2) for t, p in ((q, pq), (k, pk), (v, pk)))
    out = _compiled_flex(qt, kt, vt, block_mask=block_mask)
    return out.transpose(1, 2)[:, :lq]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(d)``.

    Args:
        q: ``[B, Lq, N, d]``; k, v: ``[B, Lk, N, d]``.
        mask: None, a boolean ``[Lq, Lk]`` tensor (True = attend) or a flex ``BlockMask``.
    Returns:
        ``[B, Lq, N, d]`` in q's dtype.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        return _flex(q, k, v, mask)
    if mask is None and _use_flash(q):
        dtype = q.dtype
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = _flash_fn(q.to(half), k.to(half), v.to(half))
        out = out[0] if isinstance(out, tuple) else out
        return out.to(dtype)
    with _sdpa_context(q.device.type):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
    return out.transpose(1, 2)
