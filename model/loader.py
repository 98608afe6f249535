"""One checkpoint loader for every weights format (model_and_inference.md §2.2, §7.1, §12; training.md §2.5, §8.3):
a Wan2.1 folder (one safetensors file or an index + shards), a diffusers folder or pipeline root, a ``.safetensors``,
or a ``.pt``/``.pth`` (released or trainer entries, a bare state dict), ending in original Wan2.1 key names and a
strict load; a misfit raises ONE :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""

from __future__ import annotations

import glob
import json
import logging
import os
import re

import torch
from safetensors.torch import load_file

from model.config import PRESET_ALIASES, WanConfig, get_preset
from model.rope import RotaryTables
from model.wan import WanModel
from model.weights import (
    WAN_DIT_INDEX,
    WAN_DIT_WEIGHTS,
    download_hint_for_checkpoint,
    resolve_checkpoint,
    shard_names,
    wan_download_hint,
    wan_repo_id,
)
from utils.errors import CheckpointError, ConfigError, one_line, state_dict_mismatch
from utils.io import AtomicPath

log = logging.getLogger(__name__)

DIFFUSERS_CLASSES = ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel")
# Path segments that wrappers insert into parameter names: the reference WanDiffusionWrapper attribute (``model``),
# DDP (``module``), FSDP, activation checkpointing and torch.compile. No Wan parameter has a segment of these names.
WRAPPER_SEGMENTS = frozenset({"model", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
RELEASE_PREFIX = "model."  # the reference wrapper's attribute: keys of released checkpoints start with it
_LIST_LIMIT = 8

# Original <-> diffusers key names (model_and_inference.md §7.1). Each entry is (original, diffusers); an entry that
# ends in "." renames a prefix, any other entry renames a whole key (or, inside a block, the rest after "blocks.N.").

_TOP_LEVEL = (
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    # image-conditioned extras (not used by the t2v model, converted so that the mapping stays lossless)
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
)
_IN_BLOCK = (
    ("modulation", "scale_shift_table"),
    *((f"{ours}.{a}.", f"{theirs}.to_{a}.") for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a in "qkv"),
    ("self_attn.o.", "attn1.to_out.0."),
    ("cross_attn.o.", "attn2.to_out.0."),
    *((f"{ours}.norm_{a}.", f"{theirs}.norm_{a}.") for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a in "qk"),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    # diffusers swaps the names of the two post-attention norms: original norm3 (affine, before cross-attention) is
    # diffusers norm2, original norm2 (no parameters, before the FFN) is diffusers norm3.
    ("norm3.", "norm2."),
    ("norm2.", "norm3."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
)
_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.*)$")
_DIFFUSERS_KEY_RE = re.compile(r"^(condition_embedder\.|proj_out\.|scale_shift_table$|blocks\.\d+\.(attn1|attn2)\.)")


def _rename(key: str, to_diffusers: bool) -> str:
    """One key through the table; keys the table does not know pass unchanged (a strict load reports them)."""
    match = _BLOCK_RE.match(key)
    prefix, rest, table = (match.group(1), match.group(2), _IN_BLOCK) if match else ("", key, _TOP_LEVEL)
    for original, diffusers in table:
        src, dst = (original, diffusers) if to_diffusers else (diffusers, original)
        if rest == src or (src.endswith(".") and rest.startswith(src)):
            return prefix + dst + rest[len(src):]
    return key


def _rename_all(sd: dict, rename, what: str) -> dict:
    out, source = {}, {}   # new key -> value, new key -> old key
    for key, value in sd.items():
        new = rename(key)
        if new in out:
            raise CheckpointError(f"{what}: keys {source[new]!r} and {key!r} both become {new!r}")
        out[new], source[new] = value, key
    return out


def convert_original_to_diffusers(sd: dict) -> dict:
    """Original Wan2.1 key names -> diffusers ``WanTransformer3DModel`` names (values untouched)."""
    return _rename_all(sd, lambda k: _rename(k, True), "original -> diffusers key conversion")


def convert_diffusers_to_original(sd: dict) -> dict:
    """Diffusers ``WanTransformer3DModel`` key names -> original Wan2.1 names (exact inverse of the above)."""
    return _rename_all(sd, lambda k: _rename(k, False), "diffusers -> original key conversion")


def normalize_keys(sd: dict) -> dict:
    """Drop wrapper segments (``model.``, ``module.``, FSDP / checkpoint / compile wrappers) wherever they occur and
    convert diffusers names to original ones. Idempotent; values are not copied."""
    stripped = _rename_all(sd, lambda k: ".".join(s for s in k.split(".") if s not in WRAPPER_SEGMENTS),
                           "stripping wrapper prefixes")
    diffusers_named = any(_DIFFUSERS_KEY_RE.match(k) for k in stripped)
    return convert_diffusers_to_original(stripped) if diffusers_named else stripped


def _download_hint(path: str) -> str:
    """``"; <the hf download command>"`` for a released checkpoint or Wan2.1 folder path, else ``""``."""
    if hint := download_hint_for_checkpoint(path):
        return f"; get it with: {hint}"
    return f"; {wan_download_hint(path)}" if wan_repo_id(path) else ""


def _resolve_model_folder(folder: str) -> str:
    """A diffusers pipeline root (``model_index.json`` + ``transformer/``) -> its ``transformer/`` folder."""
    sub = os.path.join(folder, "transformer")
    has_own = os.path.isfile(os.path.join(folder, "config.json")) or glob.glob(os.path.join(folder, "*.safetensors"))
    return sub if not has_own and os.path.isdir(sub) else folder


def _read_file(path: str):
    """A ``.safetensors`` file's tensors, else a torch file's object (weights only), on the CPU."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign, or objects weights_only refuses: say which file, in one line
        cause = one_line(err)  # an empty file's EOFError has none
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}"
                              + (f": {cause}" if cause else " (empty or cut-short file?)")) from err


def _read_folder(folder: str) -> dict:
    """All tensors of a Wan / diffusers model folder: one safetensors file, or an index and its shards."""
    folder = _resolve_model_folder(folder)
    indexes = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
    preferred = os.path.join(folder, WAN_DIT_INDEX)
    index = preferred if preferred in indexes else (indexes[0] if len(indexes) == 1 else None)
    if index is not None:
        try:
            shards = shard_names(index)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"unreadable shard index {index}: {type(err).__name__}: {err}") from err
        if missing := [s for s in shards if not os.path.isfile(os.path.join(folder, s))]:
            raise CheckpointError(f"{folder}: {len(missing)} of {len(shards)} shards listed in "
                                  f"{os.path.basename(index)} are missing ({', '.join(missing[:_LIST_LIMIT])})"
                                  f"{_download_hint(folder)}")
        return {k: v for shard in shards for k, v in _read_file(os.path.join(folder, shard)).items()}
    single = os.path.join(folder, WAN_DIT_WEIGHTS)
    files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if len(files) != 1:
        found = f"{len(files)} .safetensors files and no index" if files else "no weights"
        raise CheckpointError(f"{folder}: {found}; expected {WAN_DIT_WEIGHTS} or {WAN_DIT_INDEX} with its shards"
                              f"{_download_hint(folder)}")
    return _read_file(files[0])


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_weights_file(path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch file, keys as stored (the VAE and preview decoder files)."""
    path = os.fspath(path)
    sd = _read_file(path)
    if not _is_state_dict(sd):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return sd


# A ``.pt``'s entries in the order the published trainers read ``generator_ckpt`` (their CD and DMD trainers write only
# ``generator_ema`` once the EMA has started, and the next stage must still start from such a file).
ENTRY_ORDER = ("generator", "model", "generator_ema")


def _select_entry(obj, path: str, use_ema: bool, key: str | None) -> tuple[dict, str]:
    """``(state dict, entry name)`` of a loaded ``.pt`` as :func:`read_state_dict` picks it (no non-EMA fallback)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if key is None and not use_ema and _is_state_dict(obj):
        return obj, "state dict"
    explicit = key is not None or use_ema
    wanted = (key or "generator_ema") if explicit else "generator"
    found = wanted if explicit else next((name for name in ENTRY_ORDER if name in obj), None)
    if found not in obj:
        entries = ", ".join(repr(k) for k in obj) if not _is_state_dict(obj) else "none: it is a bare state dict"
        advice = "; run without --use_ema to load the non-EMA weights" if key is None and use_ema else ""
        raise CheckpointError(f"{path} has no {wanted!r} entry (entries: {entries}){advice}")
    if not _is_state_dict(obj[found]):
        raise CheckpointError(f"{path}: entry {found!r} is not a state dict of tensors")
    return obj[found], found


def read_state_dict(path, use_ema: bool = False, key: str | None = None) -> dict[str, torch.Tensor]:
    """CPU weights with original Wan2.1 key names from any source (module docstring). A ``.pt`` gives its ``key``
    entry (e.g. ``"critic"``), with ``use_ema`` its ``generator_ema`` (else an error), otherwise the first of
    :data:`ENTRY_ORDER` or the bare state dict; which one is logged."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}{_download_hint(path)}")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        if use_ema or key:
            wanted = key or "generator_ema"
            raise CheckpointError(f"{path} is a plain state dict with no {wanted!r} entry; run without --use_ema")
        return normalize_keys(_read_folder(path) if os.path.isdir(path) else _read_file(path))
    sd, entry = _select_entry(_read_file(path), path, use_ema, key)
    if entry == "generator_ema" and not use_ema and key is None:
        log.warning("%s has no 'generator' entry: loading its 'generator_ema' weights (as the published trainers "
                    "do)", path)
    else:
        log.info("%s: loading entry %r", path, entry)
    return normalize_keys(sd)


def _config_from_diffusers(d: dict, path: str) -> WanConfig:
    """Diffusers ``WanTransformer3DModel`` config -> :class:`WanConfig` (only text-to-video models)."""
    for name in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if d.get(name) is not None:
            raise ConfigError(f"{path}: {name}={d[name]} is an image-conditioned model; only t2v is supported")
    if d.get("inject_sample_info"):
        raise ConfigError(f"{path}: inject_sample_info (fps conditioning) is not supported")
    qk_norm = d.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in ("rms_norm_across_heads", None):
        raise ConfigError(f"{path}: qk_norm={qk_norm!r} is not supported (only 'rms_norm_across_heads' or null)")
    known = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
             "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
             "rope_max_seq_len", "pos_embed_seq_len", "inject_sample_info", "num_frame_per_block", "window_size"}
    if unknown := sorted(k for k in d if not k.startswith("_") and k not in known):
        log.warning("%s: ignoring diffusers config keys %s", path, ", ".join(unknown))
    try:
        heads = int(d["num_attention_heads"])
        return WanConfig(dim=heads * int(d["attention_head_dim"]), num_heads=heads, num_layers=int(d["num_layers"]),
                         ffn_dim=int(d["ffn_dim"]), freq_dim=int(d["freq_dim"]), text_dim=int(d["text_dim"]),
                         in_dim=int(d["in_channels"]), out_dim=int(d.get("out_channels") or d["in_channels"]),
                         patch_size=tuple(d["patch_size"]), qk_norm=qk_norm is not None,
                         cross_attn_norm=bool(d["cross_attn_norm"]), eps=float(d["eps"]),
                         rope_max_positions=int(d.get("rope_max_seq_len", 1024)))
    except KeyError as err:
        raise ConfigError(f"{path}: diffusers config lacks {err.args[0]!r}") from err


def read_model_config(folder) -> WanConfig:
    """:class:`WanConfig` from the ``config.json`` of a Wan or diffusers folder (or pipeline root)."""
    folder = _resolve_model_folder(os.fspath(folder))
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model config not found: {path}{_download_hint(folder)}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"unreadable model config {path}: {err}") from err
    if d.get("_class_name") in DIFFUSERS_CLASSES or "num_attention_heads" in d:
        return _config_from_diffusers(d, path)
    return WanConfig.from_dict(d)


def load_strict(model: torch.nn.Module, sd: dict, source: str, what: str = "the model") -> None:
    """Load ``sd`` with strict names and shapes (one :class:`CheckpointError` naming every misfit). A model on
    ``meta`` takes the tensors themselves (no second copy); otherwise values are copied and cast."""
    if problems := state_dict_mismatch(model.state_dict(), sd):
        raise CheckpointError(f"{source} does not fit {what}: {problems}")
    model.load_state_dict(sd, strict=True, assign=any(p.is_meta for p in model.parameters()))


def _resolve_source(source) -> tuple[WanConfig, str | None]:
    """``(config, folder)``; folder is None for a preset name or a WanConfig (random initialisation)."""
    if isinstance(source, WanConfig):
        return source, None
    source = os.fspath(source)
    if os.path.isdir(source):
        return read_model_config(source), source
    # A path, or a download folder's name ("Wan2.1-T2V-1.3B"), means weights: never fall back to random init.
    if os.sep in source or "/" in source or source in PRESET_ALIASES:
        raise CheckpointError(f"Wan model folder not found: {source}{_download_hint(source)}")
    return get_preset(source), None


def build_wan_model(source, causal: bool, num_frame_per_block: int = 1, independent_first_frame: bool = False,
                    local_attn_size: int = -1, sink_size: int = 0, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, checkpoint_path=None, use_ema: bool = False) -> WanModel:
    """A :class:`WanModel` from a Wan folder (weights loaded) or a preset name / WanConfig (random init), or with
    ``checkpoint_path``'s weights (``generator_ema`` with ``use_ema``) instead of the folder's (only its
    ``config.json`` is read). With weights it is built on ``meta`` and takes the loaded tensors: none initialised or
    held twice. ``dtype`` defaults to float32."""
    config, folder = _resolve_source(source)
    kwargs = dict(causal=causal, num_frame_per_block=num_frame_per_block,
                  independent_first_frame=independent_first_frame, local_attn_size=local_attn_size, sink_size=sink_size)
    if checkpoint_path is not None:   # a released path or a Hub reference is downloaded when missing
        checkpoint_path = resolve_checkpoint(os.fspath(checkpoint_path))
    weights = checkpoint_path if checkpoint_path is not None else folder
    if weights is None:
        log.info("building %s model from %s with random initialisation", "causal" if causal else "bidirectional",
                 source)
        return WanModel(config, **kwargs).to(device=device, dtype=dtype or torch.float32)
    if folder is not None and checkpoint_path is not None:
        log.info("%s: using config.json only; the checkpoint %s replaces every weight", folder, weights)
    sd = read_state_dict(weights, use_ema=use_ema if checkpoint_path is not None else False)
    with torch.device("meta"):
        model = WanModel(config, **kwargs)
    model.rope = RotaryTables(config.head_dim, config.rope_max_positions)   # plain tensors: built on meta too
    what = f"{weights} ({'generator_ema' if use_ema else 'weights'})" if checkpoint_path is not None else weights
    load_strict(model, sd, what)   # keys normalised by read_state_dict
    log.info("loaded %d tensors from %s", len(sd), what)
    del sd
    return model.to(device=device, dtype=dtype or torch.float32)


def _release_entry(sd: dict) -> dict:
    """Normalised keys under the reference wrapper's ``model.``; CPU tensors that own exactly their data."""
    out = {}
    for key, value in normalize_keys(sd).items():
        t = value.detach().to("cpu")
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)  # a view would save its whole (flat) storage
        out[RELEASE_PREFIX + key] = t
    return out


def save_release_checkpoint(path, generator_sd: dict, generator_ema_sd: dict | None = None) -> None:
    """Write ``{"generator": {"model.<key>": t}, "generator_ema": ...}`` atomically: the released checkpoints'
    layout, read by the reference code and by :func:`read_state_dict`."""
    payload = {"generator": _release_entry(generator_sd)}
    if generator_ema_sd is not None:
        payload["generator_ema"] = _release_entry(generator_ema_sd)
    with AtomicPath(path) as tmp:
        torch.save(payload, tmp)
    log.info("saved %s (%s)", path, ", ".join(f"{k}: {len(v)} tensors" for k, v in payload.items()))
