"""Building the networks a config names, the one way every entry point finds weights: ``<wan_models_dir>/<name>/``
(Wan2.1 or diffusers format) overlaid by ``generator_ckpt`` / ``--checkpoint_path``; a preset name (``tiny``) without
a folder builds random weights (tests, speed benchmarks)."""

from __future__ import annotations

import logging
import os

import torch

from model import attention
from model.config import PRESET_ALIASES, PRESETS, WanConfig, get_preset
from model.loader import build_wan_model, read_model_config
from model.scheduler import FlowMatchScheduler
from model.text_encoder import TextEncoder
from model.vae import WanVAE
from model.wan import WanModel
from model.weights import download_hint_for_checkpoint, resolve_checkpoint, resolve_wan_folder, wan_download_hint
from utils.config import VAE_SPATIAL_STRIDE, VAE_TEMPORAL_STRIDE, Config
from utils.errors import CheckpointError, ConfigError, WeightsMissingError

log = logging.getLogger(__name__)


def model_source(cfg: Config, name: str, weights: bool = True) -> str:
    """Folder of model ``name`` under ``wan_models_dir`` (downloaded when needed), else the preset name (random
    weights: ``tiny``, ``wan2.1-t2v-1.3b``; a download folder's name, ``Wan2.1-T2V-1.3B``, needs its folder).
    ``weights=False``: a checkpoint brings the weights, so a preset's architecture is as good as the folder's."""
    folder = os.path.join(cfg.wan_models_dir, name)
    preset = PRESET_ALIASES.get(name, name).lower() in PRESETS
    if weights or not (os.path.isdir(folder) or preset):
        folder = resolve_wan_folder(cfg.wan_models_dir, name, ("dit",))
    if os.path.isdir(folder):
        return folder
    if preset and not weights:   # the preset's own key: a download folder's name alone means its weights
        log.info("no folder %s: the %s architecture, the checkpoint brings every weight", folder, name)
        return PRESET_ALIASES.get(name, name).lower()
    if preset and name not in PRESET_ALIASES:
        log.warning("no folder %s: building preset %r with RANDOM weights", folder, name)
        return name
    raise WeightsMissingError(f"model folder {folder} not found; {wan_download_hint(folder)}")


def build_generator(cfg: Config, checkpoint_path: str | None = None, use_ema: bool = False, device=None, dtype=None,
                    local_attn_size: int | None = None, sink_size: int | None = None, causal: bool = True) -> WanModel:
    """The generator of ``cfg`` (block-causal; ``causal=False``: Stage 1's bidirectional base model) with
    ``checkpoint_path`` (or, when that is None, ``cfg.generator_ckpt``) loaded on top of the model folder's weights."""
    if checkpoint_path is None and cfg.generator_ckpt:
        checkpoint_path = resolve_checkpoint(cfg.generator_ckpt, "generator_ckpt")
        if not os.path.exists(checkpoint_path):
            hint = download_hint_for_checkpoint(checkpoint_path)
            raise CheckpointError(f"generator_ckpt {checkpoint_path} (from the config) not found; "
                                  + (f"get it with: {hint}" if hint else "fix generator_ckpt"))
    attention.set_backend(cfg.attention_backend)   # process-wide
    mk = cfg.model_kwargs
    source = model_source(cfg, cfg.generator_name, weights=checkpoint_path is None)
    return build_wan_model(source, causal=causal, num_frame_per_block=cfg.num_frame_per_block,
                           independent_first_frame=cfg.independent_first_frame,
                           local_attn_size=mk.local_attn_size if local_attn_size is None else local_attn_size,
                           sink_size=mk.sink_size if sink_size is None else sink_size, dtype=dtype, device=device,
                           checkpoint_path=checkpoint_path, use_ema=use_ema)


def build_bidirectional(cfg: Config, name: str, device=None, dtype=None) -> WanModel:
    """A bidirectional Wan model (real score / critic / base model) from folder ``name``."""
    attention.set_backend(cfg.attention_backend)
    return build_wan_model(model_source(cfg, name), causal=False, dtype=dtype, device=device)


def build_text_encoder(cfg: Config, device="cpu", dtype=torch.bfloat16, output_device=None) -> TextEncoder:
    """The UMT5 encoder of ``text_encoder_name`` (int8 weights with ``text_encoder_int8``, a prompt cache of
    ``text_encoder_cache_size``); its token length is the generator's ``text_len``."""
    folder = resolve_wan_folder(cfg.wan_models_dir, cfg.text_encoder_name, ("text_encoder", "tokenizer"))
    source = model_source(cfg, cfg.generator_name, weights=False)   # the generator's architecture, not built
    text_len = (read_model_config(source) if os.path.isdir(source) else get_preset(source)).text_len
    return TextEncoder.from_pretrained(folder, dtype=dtype, device=device, output_device=output_device,
                                       text_len=text_len, int8=cfg.text_encoder_int8,
                                       cache_size=cfg.text_encoder_cache_size)


def gpu_memory_budget(device: torch.device) -> int:
    """Bytes this process may hold on CUDA ``device`` (its memory fraction; at most free + what it holds)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = torch.cuda.get_per_process_memory_fraction(index)   # torch >= 2.9 (2.11 and 2.13 here)
    return min(int(total * fraction), free + torch.cuda.memory_reserved(device))


# Activations, CUDA-graph pools and decode buffers of a streamed video, per byte of network weights on the device.
# Measured (benchmarks/results/inference_h100_text_encoder_tied.json: chunk-wise 4-step, 480p, 81 frames, H100,
# 2026-12-07, a loaded-size UMT5 of 10.6 GiB): peak 23.0 GiB allocated, 26.0 reserved; minus UMT5, 2.9 GiB of
# generator and VAE and the 5.6 GiB KV cache that leaves 3.9 GiB allocated and 7.0 reserved. 2.0 per byte
# (5.8 GiB) lies between: a loaded bf16 UMT5 (10.6 GiB) is then streamed on a 24 GiB card rather than run within
# 1 GiB of its limit, and an int8 one (5.4 GiB) stays (measured: inference_h200_cap24_text_encoder_int8.json).
WORKING_SET_PER_WEIGHT_BYTE = 2.0


def video_working_bytes(config: WanConfig, latent_shape: tuple[int, int, int], num_frames: int, itemsize: int,
                        weight_bytes: int) -> int:
    """GPU memory a video of ``num_frames`` latent frames needs besides the weights already on the device
    (``weight_bytes``): its KV cache and a working set of WORKING_SET_PER_WEIGHT_BYTE per weight byte."""
    _, h, w = latent_shape
    cache = 2 * config.num_layers * num_frames * config.tokens_per_frame(h, w) * config.dim * itemsize
    return cache + int(WORKING_SET_PER_WEIGHT_BYTE * weight_bytes)


def place_text_encoder(encoder: TextEncoder, device: torch.device, working_bytes: int) -> bool:
    """Move the text encoder (built on the CPU) to CUDA ``device`` when it fits beside ``working_bytes``; otherwise
    return False and stream it there layer by layer per new prompt (``TextEncoder.stream_device``: the 24 GB mode)."""
    weights = sum(p.nbytes for p in encoder.parameters())
    room = gpu_memory_budget(device) - torch.cuda.memory_allocated(device)
    if weights + working_bytes > room:
        log.info("text encoder: %.1f GiB of weights and %.1f GiB for the video exceed the %.1f GiB left on %s: "
                 "weights stay on the CPU, streamed to the GPU layer by layer per new prompt", weights / 2**30,
                 working_bytes / 2**30, room / 2**30, device)
        encoder.stream_device = device
        return False
    encoder.encoder.to(device)
    return True


def placed_text_encoder(cfg: Config, generator: WanModel, device: torch.device, dtype: torch.dtype,
                        text_encoder_device=None) -> TextEncoder:
    """The text encoder on ``text_encoder_device``, or by default (CUDA) where :func:`place_text_encoder` puts it."""
    if text_encoder_device is not None or device.type != "cuda":
        return build_text_encoder(cfg, device=text_encoder_device or device, dtype=dtype, output_device=device)
    encoder = build_text_encoder(cfg, device="cpu", dtype=dtype, output_device=device)
    shape = cfg.image_or_video_shape
    itemsize = next(generator.parameters()).element_size()
    working = video_working_bytes(generator.config, tuple(shape[2:]), shape[1], itemsize,
                                  torch.cuda.memory_allocated(device))
    place_text_encoder(encoder, device, working)
    return encoder


def build_vae(cfg: Config, device="cpu", dtype=torch.float32) -> WanVAE:
    """The Wan VAE of ``text_encoder_name`` (``Wan2.1_VAE.pth``, else a diffusers ``vae/`` folder), checked against
    the strides and latent channels the config derives its pixel geometry with."""
    folder = os.path.join(cfg.wan_models_dir, cfg.text_encoder_name)
    if os.path.isfile(os.path.join(folder, "Wan2.1_VAE.pth")) or not os.path.isdir(os.path.join(folder, "vae")):
        folder = resolve_wan_folder(cfg.wan_models_dir, cfg.text_encoder_name, ("vae",))
    else:
        folder = os.path.join(folder, "vae")
    vae = WanVAE.from_pretrained(folder, torch_dtype=dtype).to(device)
    found = (vae.temporal_compression, vae.spatial_compression, vae.latent_channels)
    wanted = (VAE_TEMPORAL_STRIDE, VAE_SPATIAL_STRIDE, cfg.image_or_video_shape[2])
    if found != wanted:
        raise ConfigError(f"VAE {folder}: temporal/spatial stride and latent channels {found} differ from the "
                          f"config's {wanted} (image_or_video_shape[2] and the Wan VAE strides)")
    return vae


def build_scheduler(cfg: Config) -> FlowMatchScheduler:
    """The generator's 1000-step flow-matching grid, shifted by ``timestep_shift``."""
    return FlowMatchScheduler(num_train_timesteps=cfg.num_train_timestep, shift=cfg.timestep_shift)
