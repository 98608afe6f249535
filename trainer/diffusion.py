"""Stage 1: autoregressive diffusion on clean latents (training.md §3; docs/stage1.md), loss
``mean w(t)·(v_θ − (ε − x0))²`` in float32. Timesteps stay float32 (the reference's bf16 cast quantised them); each
sample's draws are keyed by its position in one global sample stream, so any world size computes the same steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.components import build_generator, build_scheduler, build_text_encoder
from trainer.batches import DataPosition, GlobalStreamSampler, ResumableBatches
from trainer.objective import Networks, Objective
from utils.config import Config
from utils.datasets import LatentLMDBDataset
from utils.errors import ConfigError, DataError

NUM_TIMESTEP_BUCKETS = 4  # per-bucket MSE metrics: quarters of [0, num_train_timestep]
# Independent random streams of one sample: its noise and timesteps, caption dropout, the draws of its one-frame image
# sample (image_loss_weight). All come from CPU generators: the same draws on every device, and no per-sample kernel
# launches on a GPU (a batch's draws reach it in one copy).
DRAW_STREAM, CAPTION_STREAM, IMAGE_STREAM = 0, 1, 2


def sample_generators(seed: int, sample_ids: torch.Tensor, stream: int) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per sample id (int64 ``[B]``), its 63-bit seed mixed from ``(seed, sample_id,
    stream)``."""
    generators = []
    for sample_id in sample_ids.tolist():
        words = np.random.SeedSequence([seed % 2**63, int(sample_id), stream]).generate_state(2, dtype=np.uint32)
        generators.append(torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1])))
    return generators


@dataclass
class DiffusionDraw:
    """The randomness of one stage-1 loss evaluation."""

    noise: torch.Tensor                         # eps, [B, F, C, H, W]
    t: torch.Tensor                             # float32 grid timesteps, [B, F]
    clean_t: torch.Tensor | None = None         # context-augmentation timesteps, [B, F] (teacher forcing only)
    clean_noise: torch.Tensor | None = None     # context-augmentation noise, [B, F, C, H, W]


class DiffusionObjective(Objective):
    """Stage-1 objective (``trainer: diffusion``); ``num_workers`` DataLoader processes read the LMDB."""

    def __init__(self, cfg: Config, num_workers: int = 2):
        _check_config(cfg)
        self.cfg = cfg
        self.scheduler = build_scheduler(cfg)
        self.num_workers = num_workers
        self.device = torch.device("cpu")
        self.compute_dtype = torch.float32   # dtype of the generator's latent and text inputs
        self.data_position = DataPosition()

    def build_networks(self, device: torch.device) -> Networks:
        cfg = self.cfg
        device = torch.device(device)
        generator = build_generator(cfg, device=device, causal=cfg.causal)  # resolves generator_ckpt
        generator.requires_grad_(True).train()  # gradient checkpointing is the loop's (applied from outside)
        # Mixed precision: the loop's FSDP policy computes in bf16 but does not cast forward inputs (a cast would round
        # t), so latents and text go in as bf16 here and timesteps as fp32. The frozen encoder simply runs in bf16.
        mixed = cfg.mixed_precision and device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if mixed else torch.float32
        text_encoder = build_text_encoder(cfg, device=device, dtype=self.compute_dtype, output_device=device)
        self.device = device
        return Networks(trainable={"generator": generator}, frozen={"text_encoder": text_encoder})

    def attach(self, networks: Networks) -> None:
        super().attach(networks)
        # Sharded parameters (DTensor) report the device of their local shard.
        self.device = next(networks.trainable["generator"].parameters()).device

    def data(self, rank: int, world_size: int, seed: int) -> Iterator[Any]:
        """Per-rank batches ``{"prompts", "clean_latent" [B, F, C, H, W], "sample_id" [B]}`` of one global stream."""
        cfg = self.cfg
        dataset = LatentLMDBDataset(cfg.data_path, max_pair=cfg.max_pair)
        if len(dataset) == 0:
            raise DataError(f"{cfg.data_path} holds no samples")
        dataset.check_latent_shape(cfg.image_or_video_shape[1:])
        sampler = GlobalStreamSampler(len(dataset), seed=seed, num_replicas=world_size, rank=rank)
        return self.data_position.attach(ResumableBatches(dataset, sampler, cfg.batch_size, self.num_workers))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings ``[B, text_len, text_dim]`` float32 on the training device (one encoder call)."""
        return self.networks.frozen["text_encoder"].encode(list(prompts)).to(self.device, torch.float32)

    def drop_captions(self, prompts: list[str], sample_ids: torch.Tensor | None = None) -> list[str]:
        """``prompts``, each replaced by ``""`` with probability ``caption_dropout`` (one draw from the prompt's
        generator keyed by ``sample_ids``, else the global CPU RNG; none at probability 0)."""
        p = self.cfg.caption_dropout
        if p <= 0:
            return list(prompts)
        if sample_ids is None:
            uniform = torch.rand(len(prompts))
        else:
            gens = sample_generators(self.cfg.seed, sample_ids, CAPTION_STREAM)
            uniform = torch.cat([torch.rand(1, generator=g) for g in gens])
        drop = (uniform < p).tolist()   # rand lies in [0, 1): p = 1 drops every caption
        return ["" if d else text for text, d in zip(prompts, drop)]

    def draw(self, x0: torch.Tensor, sample_ids: torch.Tensor | None = None,
             stream: int = DRAW_STREAM) -> DiffusionDraw:
        """Noise and timesteps for ``x0 [B, F, C, H, W]`` (training.md §3.3), each sample from its own CPU generator
        seeded by ``(seed, sample_ids[i], stream)`` (independent of batch, rank, world size and device), else the
        global RNG of ``x0``'s device."""
        if sample_ids is None:
            return self._draw(x0.shape, x0.dtype, x0.device, None)
        gens = sample_generators(self.cfg.seed, sample_ids, stream)
        draws = [self._draw((1, *x0.shape[1:]), x0.dtype, torch.device("cpu"), g) for g in gens]
        pin = x0.device.type == "cuda"   # pinned: the copy does not wait for the GPU's queue

        def stack(name: str) -> torch.Tensor | None:
            if getattr(draws[0], name) is None:
                return None
            stacked = torch.cat([getattr(d, name) for d in draws])
            return (stacked.pin_memory() if pin else stacked).to(x0.device, non_blocking=True)

        return DiffusionDraw(stack("noise"), stack("t"), stack("clean_t"), stack("clean_noise"))

    def _draw(self, shape: torch.Size | tuple, dtype: torch.dtype, device: torch.device,
              generator: torch.Generator | None) -> DiffusionDraw:
        cfg = self.cfg
        b, f = shape[:2]
        randn = lambda: torch.randn(shape, generator=generator, device=device, dtype=dtype)  # noqa: E731
        noise = randn()
        # One timestep per block, constant within it; the bidirectional base model takes one per sample.
        t = self.scheduler.sample_training_timesteps(
            b, f, num_frame_per_block=cfg.num_frame_per_block, uniform=not cfg.causal,
            independent_first_frame=cfg.independent_first_frame, generator=generator, device=device)
        if not (cfg.teacher_forcing and cfg.noise_augmentation_max_timestep > 0):
            return DiffusionDraw(noise, t)
        grid = self.scheduler.timesteps
        # Grid entries are descending: indices from `low` on are the timesteps <= the configured maximum.
        low = min(int((grid > cfg.noise_augmentation_max_timestep).sum()), len(grid) - 1)
        index = self.scheduler.sample_block_indices(
            b, f, cfg.num_frame_per_block, low=low, independent_first_frame=cfg.independent_first_frame,
            generator=generator, device=device)
        # Independent noise for the context (the reference reused eps, training.md §12 item 19).
        return DiffusionDraw(noise, t, grid.to(device)[index], randn())

    def denoising_loss(self, generator: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor,
                       draw: DiffusionDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted flow-matching loss (training.md §3.3 step 8) and the unweighted per-frame MSE ``[B, F]``."""
        dtype = self.compute_dtype
        x_t = self.scheduler.add_noise(x0, draw.noise, draw.t).to(dtype)
        target = self.scheduler.training_target(x0, draw.noise)
        context = context.to(dtype)
        if self.cfg.teacher_forcing:
            clean = x0 if draw.clean_t is None else self.scheduler.add_noise(x0, draw.clean_noise, draw.clean_t)
            flow = generator.forward_teacher_forcing(x_t, draw.t, context, clean_x=clean.to(dtype),
                                                     clean_t=draw.clean_t)
        else:
            flow = generator(x_t, draw.t, context)  # block-causal mask (diffusion forcing) or bidirectional
        mse = (flow.float() - target.float()).pow(2).mean(dim=(2, 3, 4))    # [B, F], float32
        weight = self.scheduler.training_weight(draw.t) if self.cfg.loss_weighting == "gaussian" else 1.0
        loss = (mse * weight * self.frame_weights(mse.shape[1], mse.device)).mean()
        return loss, mse

    def loss(self, phase: str, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if phase != "generator":
            raise ValueError(f"the diffusion objective has one phase, 'generator'; got {phase!r}")
        x0 = batch["clean_latent"].to(self.device, torch.float32, non_blocking=True)
        sample_ids = batch.get("sample_id")   # present in the loop's batches: per-sample, world-size-free draws
        context = self.encode_prompts(self.drop_captions(batch["prompts"], sample_ids))
        generator = self.networks.trainable["generator"]
        draw = self.draw(x0, sample_ids)
        loss, mse = self.denoising_loss(generator, x0, context, draw)
        metrics = {"loss": loss.detach(), **self._bucket_metrics(mse.detach(), draw.t)}
        if self.cfg.image_loss_weight > 0:
            # Latent frame 0 is what the causal VAE makes of pixel frame 0 alone: an image's latent, denoised alone.
            image = x0[:, :1]
            image_loss, _ = self.denoising_loss(generator, image, context, self.draw(image, sample_ids, IMAGE_STREAM))
            metrics["video_loss"], metrics["image_loss"] = loss.detach(), image_loss.detach()
            loss = loss + self.cfg.image_loss_weight * image_loss
            metrics["loss"] = loss.detach()
        return loss, metrics

    def _bucket_metrics(self, mse: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted MSE per timestep quarter, ``mse_t<lo>-<hi>``; NaN when no frame of the batch fell in it."""
        n = self.scheduler.num_train_timesteps
        edges = [round(n * i / NUM_TIMESTEP_BUCKETS) for i in range(NUM_TIMESTEP_BUCKETS + 1)]
        metrics = {}
        for lo, hi in zip(edges, edges[1:]):
            inside = (t >= lo) & ((t < hi) if hi < n else (t <= hi))
            # Tensor ops only: no host sync here; the loop reads metrics on log steps.
            metrics[f"mse_t{lo}-{hi}"] = (mse * inside).sum() / inside.sum()
        return metrics


def _check_config(cfg: Config) -> None:
    if not cfg.data_path:
        raise ConfigError("trainer: diffusion needs data_path (a latent LMDB; make one with "
                          "python -m app.encode_videos)")
    if cfg.teacher_forcing and not cfg.causal:
        raise ConfigError("teacher_forcing: true needs a causal generator; the bidirectional base model "
                          "(causal: false) trains with teacher_forcing: false")
    if cfg.noise_augmentation_max_timestep > 0 and not cfg.teacher_forcing:
        raise ConfigError("noise_augmentation_max_timestep noises the teacher-forcing context; "
                          "it needs teacher_forcing: true")
