"""The diffusers-shaped parts of :class:`pipeline.streaming.StreamingPipeline`: what ``from_pretrained`` reads (a
config by path or shipped name, or a released file of zhuhz22/Causal-Forcing with the shipped config and
``--use_ema`` of its published command), video lengths in video frames, and the ``output_type`` of whole videos."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.weights import CAUSAL_FORCING_REPO
from utils.config import VAE_TEMPORAL_STRIDE, Config, load_config
from utils.paths import CONFIGS_DIR, in_repository

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
# Each released file (model.weights.RELEASED_CHECKPOINTS) -> (shipped config, read with --use_ema), as the published
# README runs it. longvideo.pt runs as it was trained: Rolling Forcing (the published long_video/ inference).
RELEASED_CONFIGS = {
    "chunkwise/causal_forcing.pt": ("causal_forcing_dmd_chunkwise", False),
    "framewise/causal_forcing.pt": ("causal_forcing_dmd_framewise", True),
    "causal-forcing++/framewise-2step.pt": ("causal_forcing_dmd_framewise_2step", True),
    "causal-forcing++/framewise-1step.pt": ("causal_forcing_dmd_framewise_1step", True),
    "chunkwise/longvideo.pt": ("rolling_forcing_dmd", True),
    **{f"{mode}/{stage}.pt": (f"{config}_{mode}", False) for mode in ("framewise", "chunkwise")
       for stage, config in (("ar_diffusion", "ar_diffusion_tf"), ("causal_ode", "causal_ode"),
                             ("causal_cd", "causal_cd"))},
}


def pretrained_config(name: str, checkpoint: str | None = None, use_ema: bool | None = None,
                      overrides: list[str] | None = None) -> tuple[Config, str | None, bool]:
    """``(config, checkpoint, use_ema)`` for a YAML path, a shipped config's name (``toy/causal_forcing_dmd_chunkwise``)
    or a released file (``zhuhz22/Causal-Forcing/chunkwise/causal_forcing.pt``, also the default checkpoint)."""
    released = RELEASED_CONFIGS.get(name.removeprefix(f"{CAUSAL_FORCING_REPO}/"))
    if released is not None:
        checkpoint = checkpoint or name
        use_ema = released[1] if use_ema is None else use_ema
    path = in_repository(released[0] if released else name)
    if not path.endswith((".yaml", ".yml")):
        path = in_repository(CONFIGS_DIR / f"{path}.yaml")
    return load_config(path, overrides), checkpoint, bool(use_ema)


def latent_frames_for(num_frames: int, prefix: int, tiles: Callable[[int], bool], frames_per_block: int) -> int:
    """Latent frames to generate after ``prefix`` for a video of ``num_frames`` frames (``4k + 1``: the VAE decodes
    latent frame 0 to one frame, every later one to 4) that ``tiles`` into blocks; else ValueError."""
    stride = VAE_TEMPORAL_STRIDE
    latent = 1 + (num_frames - 1) // stride if num_frames >= 1 else 0
    if (num_frames - 1) % stride == 0 and latent > prefix and tiles(latent):
        return latent - prefix
    valid = [1 + stride * (f - 1) for f in range(prefix + 1, latent + 3 * frames_per_block + 2) if tiles(f)]
    below, above = [t for t in valid if t < num_frames], [t for t in valid if t > num_frames]
    nearest = " or ".join(str(t) for t in (below[-1:] + above[:1]))
    raise ValueError(f"num_frames={num_frames} is not a video length this model makes ({stride}k + 1 frames, whole "
                     f"blocks of {frames_per_block} latent frames); nearest: {nearest} (or give num_latent_frames)")


def as_output_type(frames: torch.Tensor | None, output_type: str):
    """A whole video's frames (uint8 ``[B, T, H, W, 3]`` for "np" and "pil") as ``output_type`` asks."""
    if output_type in ("pt", "latent"):
        return frames
    frames = frames.numpy()
    if output_type == "pil":
        from PIL import Image

        return [[Image.fromarray(frame) for frame in video] for video in frames]
    return frames
