"""The published YAML format (thu-ml/Causal-Forcing ``configs/*.yaml``, Self Forcing's ``self_forcing_dmd.yaml``):
what happens to each top-level key our schema does not read (README "Configs" gives the rules). A file is published
when it has no ``base:``, sets a compatibility or secret key and none of :data:`OWN_KEYS`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from utils.errors import ConfigError

logger = logging.getLogger(__name__)

_FSDP_WRAP = (("size", "transformer"), "no effect: FSDP2 shards every transformer block of every network")
_UNREAD = (None, "the published code never uses it")
# key -> (values we can honour, or None for any; why the key has no effect here)
COMPAT_KEYS: Dict[str, Tuple[Optional[Tuple[Any, ...]], str]] = {
    "generator_fsdp_wrap_strategy": _FSDP_WRAP, "real_score_fsdp_wrap_strategy": _FSDP_WRAP,
    "fake_score_fsdp_wrap_strategy": _FSDP_WRAP, "text_encoder_fsdp_wrap_strategy": _FSDP_WRAP,
    "distribution_loss": (("dmd",), "DMD is the only distribution loss"),
    "load_raw_video": ((False,), "training reads latents: encode videos once with python -m app.encode_videos"),
    "i2v": ((False,), "image-conditioned training is not implemented (inference.py --i2v is image-to-video)"),
    "is_causal": ((True,), "the consistency-distillation student is always block-causal"),
    "backward_simulation": ((True,), "the self-forcing rollout always simulates the generator's input"),
    "tf": (None, "the published train.py stored its --tf flag and never read it"),
    **{key: _UNREAD for key in (
        "spatial_sf", "generator_grad", "generator_task", "grad_accum", "discriminator_lr_multiplier", "ckpt_step",
        "prompt_name", "prompt_path", "eval_first_n", "num_samples", "rtf_ema_ratio", "eval_interval",
        "eval_num_output_frames", "eval_num_init_frames", "rtf_single_gpu_batch", "given_first_chunk")},
}
# Secrets the published YAMLs held; the value names the environment variable to export instead.
SECRET_KEYS = {"wandb_key": "WANDB_API_KEY", "wandb_host": "WANDB_BASE_URL"}
# Keys that a published YAML carries with the published meaning (the published trainers never read them).
PUBLISHED_MEANINGS = {"total_batch_size": "no gradient accumulation (global batch = batch_size x GPUs)",
                      "wandb_name": "the W&B run is named after the file"}
# Names people reach for, mapped to ours; only used to suggest the right key in an "unknown key" error.
KEY_HINTS = {
    "learning_rate": "lr", "critic_lr": "lr_critic", "ema_decay": "ema_weight", "cfg_scale": "guidance_scale",
    "max_iters": "max_steps", "num_steps": "max_steps", "train_steps": "max_steps", "save_every": "log_iters",
    "save_interval": "log_iters", "checkpoint_every": "log_iters", "log_interval": "log_every",
    "num_frames_per_block": "num_frame_per_block", "num_frames_per_chunk": "num_frame_per_block",
    "checkpoint_path": "generator_ckpt", "ckpt_path": "generator_ckpt", "shift": "timestep_shift",
}
OWN_KEYS: FrozenSet[str] = frozenset({"max_steps", "log_every", "wandb_mode", "config_name"})
BASE_KEY = "base"


ROLLING_FORCING_STEM = "rolling_forcing"
LONG_VIDEO_TRAINING_FRAMES = 27   # long_video/configs/default_config.yaml: num_training_frames


def published_rolling_forcing(path: Path, layers: List[Tuple[str, DictConfig, bool]]) -> None:
    """A published ``rolling_forcing*.yaml`` (the last of ``layers``; the ``long_video/`` fork had no key for it) gets
    ``rolling_forcing: true`` and, unless a layer sets it, the fork's ``num_training_frames``."""
    _, node, published = layers[-1]
    if not (published and path.stem.startswith(ROLLING_FORCING_STEM)) or "rolling_forcing" in node:
        return
    node["rolling_forcing"] = True
    filled = ""
    if not any("num_training_frames" in layer for _, layer, _ in layers):
        node["num_training_frames"] = LONG_VIDEO_TRAINING_FRAMES
        filled = f" and num_training_frames: {LONG_VIDEO_TRAINING_FRAMES} (the long_video default)"
    logger.info("%s: published Rolling Forcing YAML: rolling_forcing: true%s", path, filled)


def is_published(node: DictConfig) -> bool:
    """The published rule (module docstring) for a whole file, before its ``base:`` is taken out."""
    keys = set(node.keys())
    return (BASE_KEY not in keys and bool(keys & (set(COMPAT_KEYS) | set(SECRET_KEYS)))
            and not keys & OWN_KEYS)


def adapt_layer(node: DictConfig, source: str, string_keys: FrozenSet[str], published: bool) -> None:
    """Take the compatibility, secret, placeholder and (for a published file) published-meaning keys out of the
    top level of ``node``, warn once per class, and raise ConfigError on a compatibility value we cannot honour."""
    secrets = [key for key in SECRET_KEYS if key in node]
    for key in secrets:
        del node[key]   # first, and never read: the value must not reach a message, a log or the config
    _refuse_environment(OmegaConf.to_container(node, resolve=False), source)
    if secrets:
        exports = " / ".join(SECRET_KEYS[k] for k in secrets)
        logger.warning("%s: ignoring %s: credentials are never read from a YAML; export %s instead",
                       source, ", ".join(secrets), exports)
    placeholders = [key for key in list(node.keys()) if key in string_keys and _is_placeholder(key, node[key])]
    for key in placeholders:
        del node[key]
    if placeholders:
        logger.warning("%s: %s hold placeholders, treated as unset", source, ", ".join(placeholders))
    dropped = [key for key in list(node.keys()) if key in COMPAT_KEYS]
    for key in dropped:
        allowed, why = COMPAT_KEYS[key]
        if allowed is not None and node[key] not in allowed:
            raise ConfigError(f"{source}: {key}: {node[key]!r} is not supported ({why}); accepted: "
                              f"{', '.join(map(repr, allowed))}")
        del node[key]
    if published:
        _published_meanings(node, source, dropped)
    elif dropped:
        logger.warning("%s: ignoring keys that no code reads: %s", source, ", ".join(dropped))


_ENV_INTERPOLATION = re.compile(r"\$\{.*oc\.env\s*:", re.S)


def _refuse_environment(value: Any, source: str, key: str = "") -> None:
    """Raise on a value that interpolates an environment variable (``${oc.env:WANDB_API_KEY}``): the resolved config
    goes into every checkpoint's config.yaml and to W&B, so a secret read this way would be published with them."""
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_environment(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_environment(v, source, f"{key}[{i}]")
    elif isinstance(value, str) and _ENV_INTERPOLATION.search(value):
        raise ConfigError(f"{source}: {key} reads an environment variable (oc.env), which a config may not: it is "
                          f"saved with every checkpoint and sent to W&B; write the value (secrets stay in the "
                          f"environment, where W&B reads WANDB_API_KEY itself)")


def _published_meanings(node: DictConfig, source: str, dropped: List[str]) -> None:
    kept = [key for key in PUBLISHED_MEANINGS if key in node]
    for key in kept:
        del node[key]
    wandb_target = any(isinstance(node.get(k), str) for k in ("wandb_project", "wandb_entity"))
    if wandb_target and "wandb_mode" not in node:
        node["wandb_mode"] = "online"   # the published trainers logged to W&B unless --disable-wandb
    if dropped or kept:
        meanings = "; ".join(f"{key}: {PUBLISHED_MEANINGS[key]}" for key in kept)
        logger.warning("%s: published YAML: ignoring keys that no code reads: %s%s", source,
                       ", ".join(dropped + kept), f" (published meaning kept -- {meanings})" if kept else "")


def _is_placeholder(key: str, value: Any) -> bool:
    if isinstance(value, DictConfig):   # `{your entity}` parses as {'your entity': None}
        items = list(value.items())
        return len(items) == 1 and items[0][1] is None
    return isinstance(value, str) and value == key.upper()
