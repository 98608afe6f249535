"""The one attention entry point: ``attention(q, k, v, mask)`` on ``[B, L, N, d]`` tensors, dispatched on the mask.

* ``None``: a flash-attn package or PyTorch SDPA; on CUDA SDPA tries cuDNN attention first (on the H100 1.6-1.8x
  PyTorch's flash kernel at our shapes, libraries.md §9). An inference call with few queries against many keys (a
  one-frame block against the cache) runs cuDNN's kernel on equal parts of the keys at once and merges the parts by
  their log-sum-exp (:func:`kv_splits`): the queries alone give the kernel too few tiles to fill every SM.
* a dense boolean ``[Lq, Lk]`` mask (True = attend): SDPA, the CPU path for training masks.
* a flex-attention ``BlockMask``: compiled ``flex_attention`` over the length padded to a multiple of 128.

Unmasked calls: :func:`set_backend` once per process, :func:`flash_policy` per call (docs/architecture.md, "Attention
kernel per call")."""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
import torch.nn.functional as F

from model.masks import padded_length
from utils.errors import ConfigError

log = logging.getLogger(__name__)

_BACKENDS = ("auto", "sdpa", "flash_attn")
_state = {"backend": "auto", "sdpa_order": None, "kv_split": True}
_flash_fn = None
_flash_module = None
_compiled_flex = None

# Smallest calls "auto" gives to flash-attn: three-frame blocks (4,680 queries at 480p) against a cache of 8,192 keys
# or more; one-frame blocks go to cuDNN on split keys (docs/architecture.md, "Attention kernel per call")
FLASH_MIN_QUERIES = 4096
FLASH_MIN_KEYS = 8192
_AUTO_MODULES = ("flash_attn_interface", "flash_attn.cute")  # Hopper-class kernels that beat cuDNN attention

_FLASH_MODULES = (  # first importable wins
    ("flash_attn_interface", "flash_attn_func"),  # FlashAttention-3 (Hopper)
    ("flash_attn.cute", "flash_attn_func"),       # FlashAttention-4 (CuTe DSL: Hopper, Blackwell)
    ("flash_attn", "flash_attn_func"),            # FlashAttention-2
)


# Split-KV (docs/architecture.md, "Keys split for few queries"): cuDNN's Hopper flash kernel times like one CTA per
# 128 queries and head; a one-frame block (1,560 queries x 12 heads at 480p) makes 156, 1.2 waves on an H100's 132 SMs.
# Split the keys when that fills the waves better, in parts of at least MIN_KEYS_PER_SPLIT keys (one H100: 2,340-key
# parts lost, 3,120-key parts won; benchmarks/results/attention_kv_split_h100.json).
CUDNN_QUERY_TILE = 128
MIN_KEYS_PER_SPLIT = 3072
MAX_KV_SPLITS = 4
SPLIT_Q_VIEW = True   # the parts share one copy of the queries (False: each part gets its own, an A/B variant)


def kv_splits(lq: int, lk: int, heads: int, sms: int) -> int:
    """Parts to split the ``lk`` keys of a batch-1 call into (1 = no split). Modelled time: waves of CTAs (query
    tiles x heads x parts, ``sms`` at a time) times the keys each CTA reads (``lk / parts``). The fastest count of at
    most :data:`MAX_KV_SPLITS` that divides ``lk`` into parts of >= :data:`MIN_KEYS_PER_SPLIT` keys, if it cuts the
    modelled time by more than 10% (measured on one H100, a 4% modelled gain lost: a split costs its merge)."""
    tiles = -(-lq // CUDNN_QUERY_TILE) * heads

    def modelled(parts: int) -> float:
        return -(-tiles * parts // sms) / parts

    candidates = [p for p in range(2, MAX_KV_SPLITS + 1) if lk % p == 0 and lk // p >= MIN_KEYS_PER_SPLIT]
    best = min(candidates, key=modelled, default=1)   # min keeps the smallest count on ties
    return best if modelled(best) < 0.9 * modelled(1) else 1


def set_kv_split(enabled: bool) -> None:
    """Allow (default) or forbid split-KV attention for inference calls (A/B benchmarks)."""
    _state["kv_split"] = bool(enabled)


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Attention over all keys from attention over parts of them: ``out`` ``[P, N, Lq, d]`` and the log-sum-exp of
    each part's scaled scores ``lse`` ``[P, N, Lq(, 1)]`` -> ``[1, N, Lq, d]`` in ``out``'s dtype."""
    acc = torch.promote_types(out.dtype, torch.float32)
    weights = torch.softmax(lse.reshape(out.shape[:3]).to(acc), dim=0).unsqueeze(-1)
    return (out.to(acc) * weights).sum(0, keepdim=True).to(out.dtype)


_merge_fn = merge_splits


def compile_merge(enabled: bool = True, **options) -> None:
    """``torch.compile`` :func:`merge_splits` for split-KV calls (one fused kernel instead of five; ``enabled=False``:
    eager), process-wide; ``WanModel.compile_blocks`` / ``uncompile_blocks`` call it, so ``--no_compile`` keeps it
    eager."""
    global _merge_fn
    _merge_fn = torch.compile(merge_splits, **options) if enabled else merge_splits


def _split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: int) -> torch.Tensor:
    """One cuDNN call over ``parts`` equal slices of the keys of a batch-1 call, merged: ``[1, L, N, d]`` tensors."""
    _, lq, heads, dim = q.shape
    lk = k.shape[1]
    qs = q.expand(parts, lq, heads, dim)   # a view: every part reads the same queries (batch stride 0)
    qs = (qs if SPLIT_Q_VIEW else qs.contiguous()).transpose(1, 2)
    ks, vs = (t.reshape(parts, lk // parts, heads, dim).transpose(1, 2) for t in (k, v))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True)[:2]
    return _merge_fn(out, lse).transpose(1, 2)


def _split_parts(q: torch.Tensor, k: torch.Tensor) -> int:
    """Parts for an unmasked SDPA call (1: the plain call): inference on a Hopper GPU, batch 1, cuDNN first, half
    dtypes."""
    if not (_state["kv_split"] and q.is_cuda and q.shape[0] == 1 and _state["sdpa_order"] is None
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and q.shape[-1] <= 128):
        return 1
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return 1
    sms = _hopper_sms(q.device)
    return kv_splits(q.shape[1], k.shape[1], q.shape[2], sms) if sms else 1


_sms_by_device: dict[torch.device, int] = {}


def _hopper_sms(device: torch.device) -> int:
    """Multiprocessors of a Hopper GPU (compute capability 9.x, where the split rule was measured), else 0."""
    if device not in _sms_by_device:
        props = torch.cuda.get_device_properties(device)
        _sms_by_device[device] = props.multi_processor_count if props.major == 9 else 0
    return _sms_by_device[device]


def _load_flash():
    """The first importable flash-attn ``flash_attn_func`` of :data:`_FLASH_MODULES`, or None."""
    global _flash_fn, _flash_module
    if _flash_fn is None:
        _flash_fn = False
        for module, name in _FLASH_MODULES:
            try:
                mod = __import__(module, fromlist=[name])
                _flash_fn, _flash_module = getattr(mod, name), module
                log.info("attention: %s.%s available", module, name)
                break
            except ImportError:
                continue
            except Exception as error:  # an optional kernel package that is broken must not stop the run
                log.warning("attention: %s is installed but does not import (%s); not using it", module, error)
    return _flash_fn or None


def set_backend(name: str) -> None:
    """Select the unmasked-attention backend (config ``attention_backend``): "auto", "sdpa" or "flash_attn"."""
    if name not in _BACKENDS:
        raise ConfigError(f"attention_backend: must be one of {_BACKENDS}, got {name!r}")
    if name == "flash_attn" and _load_flash() is None:
        raise ConfigError("attention_backend: 'flash_attn' selected but no flash-attn package is installed "
                          "(pip install -e .[fa4] on Hopper or Blackwell, .[flash] for FlashAttention-2)")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


def set_sdpa_priority(order) -> None:
    """Override the CUDA SDPA kernel order (a list of ``SDPBackend``); None restores cuDNN-first."""
    _state["sdpa_order"] = list(order) if order is not None else None


def flash_policy(backend: str, module: str | None, lq: int, lk: int, needs_grad: bool) -> bool:
    """Whether an unmasked CUDA call of ``lq`` queries and ``lk`` keys goes to flash-attn ``module`` (None: none
    installed) under ``backend``; see the module docstring."""
    if module is None or backend == "sdpa":
        return False
    if backend == "flash_attn":
        return True
    return module in _AUTO_MODULES and lq >= FLASH_MIN_QUERIES and lk >= FLASH_MIN_KEYS and not needs_grad


def _use_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.device.type != "cuda" or _state["backend"] == "sdpa" or _load_flash() is None:
        return False
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return flash_policy(_state["backend"], _flash_module, q.shape[1], k.shape[1], needs_grad)


def _sdpa_context(device_type: str):
    """Prefer cuDNN attention on CUDA; elsewhere PyTorch's default choice. Inside :func:`kernel_scope` the order is
    already set."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device_type != "cuda" or _scope.depth:
        return contextlib.nullcontext()
    order = _state["sdpa_order"] or [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                     SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


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


class _Scope(threading.local):
    depth = 0


_scope = _Scope()


@contextlib.contextmanager
def kernel_scope(device_type: str):
    """Set the SDPA kernel order once around a whole forward pass instead of around each :func:`attention` call
    (why: docs/architecture.md, "SDPA kernel order set once per pass")."""
    if device_type != "cuda" or _scope.depth:
        yield
        return
    with _sdpa_context(device_type):
        _scope.depth += 1
        try:
            yield
        finally:
            _scope.depth -= 1


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(d)``: q ``[B, Lq, N, d]``, k/v ``[B, Lk, N, d]``, mask as in the module
    docstring -> ``[B, Lq, N, d]`` in q's dtype."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        return _flex(q, k, v, mask)
    if mask is None and _use_flash(q, k, v):
        dtype = q.dtype
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = _flash_fn(q.to(half), k.to(half), v.to(half))
        out = out[0] if isinstance(out, tuple) else out
        return out.to(dtype)
    if mask is None and (parts := _split_parts(q, k)) > 1:
        return _split_kv_attention(q, k, v, parts)
    with _sdpa_context(q.device.type):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
