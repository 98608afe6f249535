"""Training the toy world's VAE (issue 9): Wan's causal 3-D VAE at width 16, fitted to synthetic shape clips on a CPU.

The network is diffusers' ``AutoencoderKLWan`` (model/vae.py wraps it); this file adds what a release of it needs:

* :class:`ClipPool`: random windows of synthetic clips (``toy.world.make_split``) as ``[B, 3, T, H, W]`` in
  [-1, 1]. Training uses short windows (``1 + 4k`` frames) and spatial crops: every layer is a causal or local
  convolution, so a VAE trained on 9-frame 32x32 windows encodes 33-frame 64x64 clips into 9 latent frames.
* :func:`vae_loss`: L1 + L2 reconstruction of a reparameterised posterior sample plus a small KL term (optional:
  a first-frame code term and a first-frame pixel weight, docs/toy_results.md "Frame 0").
* :func:`train_toy_vae`: AdamW with warm-up and cosine decay, seeded, with a tqdm progress bar.
* :func:`fit_latent_stats`: the per-channel ``latents_mean`` / ``latents_std`` that WanVAE normalises with
  (``z = (mu - mean) / std``), measured on encoded training clips and stored in the VAE config.
* :func:`reconstruction_psnr`: encode + decode through :class:`model.vae.WanVAE`, PSNR in dB on [0, 1] pixels.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from model.vae import WanVAE
from model.vae_decoder import decoder_step
from toy.world import BACKGROUND
from utils.io import AtomicPath

logger = logging.getLogger(__name__)


@dataclass
class ToyVAETraining:
    """Hyper-parameters of :func:`train_toy_vae`. Defaults: the settings whose loss fell steadily on an H100
    (0.043 at step 1300 -> 0.0175 at step 2600, ~0.1 s per step; docs/toy_world.md); smaller batches of 32x32 crops
    at lr 2e-3 collapsed to a plain background on the CPU."""

    steps: int = 4000              # optimiser steps
    batch_size: int = 16           # windows per step
    num_frames: int = 9            # frames per training window (1 + 4k: 3 latent frames)
    crop: int = 0                  # side of the square spatial crop (multiple of 8); 0 = full frames
    full_size_fraction: float = 0.25  # last fraction of the steps trains on full frames, batch scaled to equal pixels
    lr: float = 5e-4               # peak AdamW learning rate
    warmup_steps: int = 50         # linear warm-up, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    kl_weight: float = 1e-6        # weight of the per-element KL(q(z|x) || N(0, 1)) against the per-pixel losses
    max_logvar: float = -6.0       # posterior log-variance cap during training (against posterior collapse)
    foreground_weight: float = 5.0  # extra loss weight of non-background pixels at step 0, annealed linearly ...
    foreground_anneal: float = 0.6  # ... to 0 at this fraction of the steps (then the loss is plain L1 + L2)
    background: tuple[int, int, int] = BACKGROUND  # uint8 colour that counts as background
    l2_weight: float = 1.0         # weight of the MSE term beside the L1 term (MSE is what PSNR measures)
    grad_clip: float = 1.0
    first_frame_code_weight: float = 0.0  # pulls latent frame 0 towards the code a later latent gives the same
    #                                       frame held still (vae_loss); 0 = Wan's own objective
    first_frame_weight: float = 1.0  # weight of each window's pixel frame 0 in the reconstruction loss (vae_loss)
    seed: int = 0

    def __post_init__(self):
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4k, got {self.num_frames}")
        if self.crop % 8 or self.crop < 0:
            raise ValueError(f"crop must be a non-negative multiple of 8, got {self.crop}")
        if not 0.0 <= self.full_size_fraction <= 1.0:
            raise ValueError(f"full_size_fraction must lie in [0, 1], got {self.full_size_fraction}")


def videos_to_tensor(videos: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` (or a list of ``[T, H, W, 3]``) -> float32 ``[B, 3, T, H, W]`` in [-1, 1]."""
    array = np.stack(videos) if isinstance(videos, list) else videos
    return torch.from_numpy(array).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


class ClipPool:
    """Random training windows cut from a fixed set of clips.

    Args:
        videos: uint8 clips ``[T, H, W, 3]`` of one size (e.g. the videos of ``make_split``).
        seed: seeds the window choice, so a run is reproducible.
    """

    def __init__(self, videos: list[np.ndarray], seed: int = 0):
        self.videos = np.stack(videos)  # [N, T, H, W, 3] uint8
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int, num_frames: int, crop: int = 0) -> torch.Tensor:
        """``[batch_size, 3, num_frames, crop, crop]`` in [-1, 1] (full frames when ``crop`` is 0)."""
        n, t, h, w, _ = self.videos.shape
        if num_frames > t:
            raise ValueError(f"windows of {num_frames} frames do not fit clips of {t}")
        ch, cw = (crop, crop) if crop else (h, w)
        windows = []
        for _ in range(batch_size):
            i, t0 = self.rng.integers(n), self.rng.integers(t - num_frames + 1)
            y0, x0 = self.rng.integers(h - ch + 1), self.rng.integers(w - cw + 1)
            windows.append(self.videos[i, t0:t0 + num_frames, y0:y0 + ch, x0:x0 + cw])
        return videos_to_tensor(np.stack(windows))


def init_posterior_logvar(model: AutoencoderKLWan, logvar: float = -6.0) -> None:
    """Start the posterior narrow: set the log-variance half of ``quant_conv``'s bias to ``logvar``.

    At the default initialisation the posterior std is ~1 while the means are ~0.1, so the decoder first sees
    mostly noise, learns to ignore the latent and training drifts towards posterior collapse. A std of ~0.05
    (logvar -6) makes the latent informative from the first step; the small KL term then widens it as it can.
    """
    z_dim = model.config.z_dim
    with torch.no_grad():
        model.quant_conv.bias[z_dim:].fill_(logvar)


def decode_unclamped(model: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """Raw latents ``[B, C, F, h, w]`` -> pixels ``[B, 3, 1 + 4(F-1), H, W]`` WITHOUT diffusers' final clamp.

    ``AutoencoderKLWan.decode`` clamps to [-1, 1], which zeroes the gradient of every pixel beyond the range: the
    dark background (-0.81) overshoots to -1 early in training and then never moves again. The streaming decoder's
    calls (:func:`model.vae_decoder.decoder_step`: first latent frame alone, then the rest in one call with the causal
    cache), which equal diffusers' per-frame loop up to float rounding; gradients flow through them.
    """
    x = model.post_quant_conv(z)
    first, cache = decoder_step(model.decoder, x[:, :, :1], None)
    if x.shape[2] == 1:
        return first
    rest, _ = decoder_step(model.decoder, x[:, :, 1:], cache)
    return torch.cat([first, rest], dim=2)


def vae_loss(model: AutoencoderKLWan, pixels: torch.Tensor, kl_weight: float, l2_weight: float = 1.0,
             generator: torch.Generator | None = None, foreground_weight: float = 0.0,
             background: tuple[int, int, int] = BACKGROUND,
             max_logvar: float | None = None,
             first_frame_code_weight: float = 0.0,
             first_frame_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction of a posterior sample plus KL; returns ``(loss, {"l1", "l2", "kl"[, "code_gap"]})``
    (unweighted parts).

    Args:
        pixels: ``[B, 3, T, H, W]`` in [-1, 1], ``T = 1 + 4k``.
        generator: source of the reparameterisation noise (on ``pixels``' device).
        foreground_weight: pixels that are not ``background`` weigh ``1 + foreground_weight``. The shapes cover a
            few percent of a clip, so an unweighted loss first settles on a plain background (a plateau that
            costs hundreds of CPU steps); weighting them makes the latent carry shapes from the start.
        max_logvar: cap of the posterior log-variance, so that the KL term cannot widen the posterior beyond it.
            A first 900-step run without it ended collapsed (posterior std 0.77 vs mean spread 0.19, decoder
            output independent of z, 16.6 dB); the cap alone did not change that run's loss curve, so the
            collapse has another main cause (open, see the issue-9 report).
        first_frame_code_weight: adds this weight times the mean squared distance between the posterior mean of
            latent frame 0 (the window's first frame, which Wan's causal encoder codes alone) and that of latent
            frame 1 of a clip holding the same frame still (1 + the temporal compression frames; no gradient
            through the target). Wan codes the first frame apart; this makes its code the one a later latent would
            give it, so that a diffusion model draws frame 0 like the others (docs/toy_results.md, "Frame 0").
            ``code_gap``: the distance relative to the target's norm.
        first_frame_weight: weight of the window's pixel frame 0 in the reconstruction terms (the others 1): the
            decoder's first-frame path decodes one frame in 1 + 4k.
    All terms are means over elements, so ``kl_weight`` does not depend on the clip size.
    """
    posterior = model.encode(pixels).latent_dist  # mean / logvar [B, 16, F, H/8, W/8]
    mu, logvar = posterior.mean, posterior.logvar
    if max_logvar is not None:
        logvar = logvar.clamp(max=max_logvar)  # no gradient beyond the cap, so the KL cannot widen it further
    noise = torch.randn(mu.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
    z = mu + torch.exp(0.5 * logvar) * noise
    recon = decode_unclamped(model, z)  # [B, 3, T, H, W]
    l1_map, l2_map = (recon - pixels).abs(), (recon - pixels).square()
    l1, l2 = l1_map.mean(), l2_map.mean()
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()
    if foreground_weight > 0 or first_frame_weight != 1.0:
        weight = torch.ones(1, 1, pixels.shape[2], 1, 1, dtype=pixels.dtype, device=pixels.device)
        weight[:, :, 0] = first_frame_weight
        if foreground_weight > 0:
            bg = torch.tensor(background, dtype=pixels.dtype, device=pixels.device).div(127.5).sub(1.0)
            is_fg = (pixels - bg.view(1, 3, 1, 1, 1)).abs().amax(1, keepdim=True) > 0.02  # [B, 1, T, H, W]
            weight = weight * (1.0 + foreground_weight * is_fg.to(pixels.dtype))
        weight = weight.expand_as(l1_map)
        recon_loss = ((l1_map + l2_weight * l2_map) * weight).mean() / weight.mean()
    else:
        recon_loss = l1 + l2_weight * l2
    loss = recon_loss + kl_weight * kl
    parts = {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}
    if first_frame_code_weight > 0:
        with torch.no_grad():
            # one latent frame after the first: 1 + scale_factor_temporal pixel frames of the first frame
            still = pixels[:, :, :1].expand(-1, -1, 1 + model.config.scale_factor_temporal, -1, -1)
            target = model.encode(still).latent_dist.mean[:, :, 1]
        gap = (mu[:, :, 0] - target).square().mean()
        loss = loss + first_frame_code_weight * gap
        parts["code_gap"] = (gap / target.square().mean()).sqrt().item()
    return loss, parts


def _lr_factor(step: int, cfg: ToyVAETraining) -> float:
    """Linear warm-up to 1, then cosine decay to ``final_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_toy_vae(model: AutoencoderKLWan, pool: ClipPool, cfg: ToyVAETraining, device: str | torch.device = "cpu",
                  progress: bool = True, state_path: str | Path | None = None, save_every: int = 500) -> list[float]:
    """Train ``model`` in place on windows of ``pool``; returns the loss of every step.

    The first ``(1 - full_size_fraction)`` of the steps use ``crop`` x ``crop`` windows; the rest use full frames
    with the batch shrunk to keep the pixel count per step (so the decoder also sees whole-frame context).

    With ``state_path``, the training state (model, optimiser, losses, step, both random streams) is written there
    atomically every ``save_every`` steps, and a run that finds the file continues from it: an interrupted build
    resumes where it stopped and ends with the same weights as an uninterrupted one.
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    full_from = cfg.steps - int(round(cfg.full_size_fraction * cfg.steps))
    full_side = pool.videos.shape[2]
    full_batch = max(1, round(cfg.batch_size * (cfg.crop / full_side) ** 2)) if cfg.crop else cfg.batch_size
    losses: list[float] = []
    gaps: list[float] = []   # code_gap per step (nan without first_frame_code_weight); logged, not saved
    first = 0
    if state_path is not None and Path(state_path).is_file():
        first, losses = _load_training_state(state_path, cfg, model, optimizer, generator, pool)
        logger.info("toy VAE: resumed at step %d from %s", first, state_path)
    start = time.monotonic()
    bar = tqdm(range(first, cfg.steps), desc="toy VAE", unit="step", disable=not progress, dynamic_ncols=True,
               initial=first, total=cfg.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        full = step >= full_from or not cfg.crop
        pixels = pool.sample(full_batch if full else cfg.batch_size, cfg.num_frames, 0 if full else cfg.crop)
        fg_weight = cfg.foreground_weight * max(0.0, 1.0 - step / max(1.0, cfg.foreground_anneal * cfg.steps))
        loss, parts = vae_loss(model, pixels.to(device), cfg.kl_weight, cfg.l2_weight, generator, fg_weight,
                               cfg.background, cfg.max_logvar, cfg.first_frame_code_weight,
                               cfg.first_frame_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        gaps.append(parts.get("code_gap", float("nan")))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", l1=f"{parts['l1']:.4f}", kl=f"{parts['kl']:.2f}",
                        **({"code_gap": f"{parts['code_gap']:.3f}"} if "code_gap" in parts else {}))
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            recent = losses[-100:]
            logger.info("toy VAE step %d/%d: loss %.4f (mean of last %d)%s, %.0f s", step + 1, cfg.steps,
                        sum(recent) / len(recent), len(recent),
                        f", first-frame code gap {np.mean(gaps[-100:]):.3f}" if cfg.first_frame_code_weight else "",
                        time.monotonic() - start)
        if state_path is not None and ((step + 1) % save_every == 0 and step + 1 < cfg.steps):
            _save_training_state(state_path, cfg, step + 1, model, optimizer, generator, pool, losses)
    model.eval().requires_grad_(False)
    return losses


def _save_training_state(path, cfg: ToyVAETraining, step: int, model, optimizer, generator, pool: ClipPool,
                         losses: list[float]) -> None:
    state = dict(config=repr(cfg), step=step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                 generator=generator.get_state(), pool_rng=json.dumps(pool.rng.bit_generator.state),
                 losses=torch.tensor(losses, dtype=torch.float64))
    with AtomicPath(path) as tmp:
        torch.save(state, tmp)


def _load_training_state(path, cfg: ToyVAETraining, model, optimizer, generator, pool: ClipPool):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != repr(cfg):
        raise SystemExit(f"{path} was written with other VAE settings ({state['config']}); delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    pool.rng.bit_generator.state = json.loads(state["pool_rng"])
    return int(state["step"]), state["losses"].tolist()


@torch.no_grad()
def fit_latent_stats(model: AutoencoderKLWan, videos: list[np.ndarray], batch_size: int = 8,
                     device: str | torch.device = "cpu") -> tuple[list[float], list[float]]:
    """Per-channel mean / std of the posterior means of ``videos``; stored as ``latents_mean`` / ``latents_std``.

    WanVAE normalises with ``(mu - mean) / std``, so afterwards the encoded clips have zero mean and unit std per
    channel (over clips, frames and positions). Returns ``(mean, std)`` as lists of ``z_dim`` floats.
    """
    model.to(device).eval()
    total = total_sq = None
    count = 0
    for i in range(0, len(videos), batch_size):
        mu = model.encode(videos_to_tensor(videos[i:i + batch_size]).to(device)).latent_dist.mean.double()
        dims = (0, 2, 3, 4)  # everything but the channel
        s, sq = mu.sum(dims), mu.square().sum(dims)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += mu.numel() // mu.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    mean_list, std_list = [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]
    model.register_to_config(latents_mean=mean_list, latents_std=std_list)
    return mean_list, std_list


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """PSNR in dB of two tensors in [-1, 1], measured on the [0, 1] scale."""
    mse = ((reference.float() - estimate.float()) / 2).square().mean().item()
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


@torch.no_grad()
def reconstruction_psnr(vae: WanVAE, videos: list[np.ndarray], batch_size: int = 4) -> tuple[float, torch.Size]:
    """Mean per-clip PSNR (dB) of ``decode(encode(clip))`` and the latent shape of one clip ``[F, C, h, w]``.

    Goes through :class:`WanVAE` (normalised latents, streaming decoder), i.e. the path the pipelines use.
    """
    scores, latent_shape = [], None
    for i in range(0, len(videos), batch_size):
        pixels = videos_to_tensor(videos[i:i + batch_size]).to(vae.device)  # [B, 3, T, H, W]
        latents = vae.encode(pixels)  # [B, F, 16, h, w]
        latent_shape = latents.shape[1:]
        recon = vae.decode(latents).permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]
        scores += [psnr(p, r) for p, r in zip(pixels, recon)]
    return sum(scores) / len(scores), latent_shape
