"""Sample videos at each checkpoint: one short video per prompt as ``<logdir>/samples/step_<N>/<prompt>.mp4``
(``.latents.pt`` without a VAE or without ffmpeg) and to W&B. Every rank runs the sharded generator; rank 0 alone
decodes and writes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from pipeline.components import build_vae
from pipeline.streaming import StreamingPipeline
from trainer.objective import Networks
from utils.config import Config
from utils.errors import UserError
from utils.io import AtomicPath
from utils.video import mp4_writer_missing, safe_output_name, write_mp4

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("A red fox trots through fresh snow in a pine forest, morning light.",
                   "Waves roll onto a sandy beach at sunset, seen from a low camera.")
SAMPLE_BLOCKS = 3   # blocks per video: a few latent frames, cheap next to the steps between two saves


class SampleWriter:
    """``SampleWriter(cfg, is_main)(networks, step, metrics)`` at each save; returns the files rank 0 wrote."""

    def __init__(self, cfg: Config, is_main: bool):
        self.cfg, self.is_main = cfg, is_main
        self._vae = None
        self._vae_tried = False
        self._written: Optional[int] = None   # the last step written: the end of a run saves its last step again

    def __call__(self, networks: Networks, step: int, metrics=None) -> list[Path]:
        cfg = self.cfg
        if step == self._written:
            return []
        self._written = step
        encoder = networks.frozen.get("text_encoder")
        if not cfg.causal or encoder is None or "generator" not in networks.trainable:
            log.info("no sample videos: they need a causal generator and a text encoder (%s has %s)",
                     cfg.config_name, "no text encoder" if cfg.causal else "a bidirectional generator")
            return []
        generator = networks.trainable["generator"]
        device = next(generator.parameters()).device
        dtype = torch.bfloat16 if cfg.mixed_precision else torch.float32   # the FSDP policy's compute dtype
        vae = self._decoder(device, dtype) if self.is_main else None
        pipe = StreamingPipeline.from_networks(cfg, generator, encoder, vae, device, dtype)
        head = 1 if cfg.independent_first_frame else 0
        frames = min(cfg.image_or_video_shape[1], head + SAMPLE_BLOCKS * cfg.num_frame_per_block)
        prompts = list(cfg.sample_prompts or DEFAULT_PROMPTS)
        video = pipe.generate(prompts, num_latent_frames=frames, seed=cfg.seed,
                              output_type="np" if vae is not None else "latent")
        return self._write(prompts, video, step, metrics) if self.is_main else []

    def _decoder(self, device: torch.device, dtype: torch.dtype):
        """The config's VAE, built once; None (latents are written) when its folder has none or no mp4 can be
        written here."""
        if not self._vae_tried:
            self._vae_tried = True
            if missing := mp4_writer_missing():
                log.warning("sample videos are written as latents: %s", missing)
                return None
            try:
                self._vae = build_vae(self.cfg, device=device, dtype=dtype)
            except (UserError, OSError) as err:
                log.warning("sample videos are written as latents: no VAE (%s)", str(err).splitlines()[0])
        return self._vae

    def _write(self, prompts: list[str], video, step: int, metrics) -> list[Path]:
        folder = Path(self.cfg.logdir) / "samples" / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        paths = []
        for i, prompt in enumerate(prompts):
            name = safe_output_name(prompt, used=used)
            if video.frames is None:
                with AtomicPath(folder / f"{name}.latents.pt") as tmp:
                    torch.save(video.latents[i].cpu(), tmp)
                paths.append(folder / f"{name}.latents.pt")
            else:
                write_mp4(folder / f"{name}.mp4", video.frames[i], fps=self.cfg.fps)
                paths.append(folder / f"{name}.mp4")
        log.info("step %d: %d sample videos in %s", step, len(paths), folder)
        if metrics is not None and video.frames is not None:
            metrics.log_videos({f"samples/{i}": str(p) for i, p in enumerate(paths)}, step)
        return paths
