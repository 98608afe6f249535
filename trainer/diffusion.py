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

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (what a DataLoader can collate)."""
        return {name: value for name, value in vars(self).items() if value is not None}

    def to(self, device: torch.device) -> "DiffusionDraw":
        """On ``device`` (a non-blocking copy: pinned sources do not wait for the GPU's queue)."""
        return DiffusionDraw(**{name: value.to(device, non_blocking=True) for name, value in self.tensors().items()})


class SampleDraws:
    """Every draw of the Stage-1 loss (training.md §3.3): noise and timesteps, the context augmentation of teacher
    forcing, caption dropout, the one-frame image sample's own noise and timestep. A sample's draws come from CPU
    generators keyed by ``(seed, its stream position, stream)``. Called on a dataset item (``draws_in_workers``), it
    makes them all in the DataLoader worker that reads the item (it pickles: the config and the scheduler, no
    networks)."""

    def __init__(self, cfg: Config, scheduler):
        self.cfg, self.scheduler = cfg, scheduler

    def __call__(self, item: dict, position: int) -> dict:
        """``draws`` of one dataset item at stream ``position`` (its latent ``clean_latent [F, C, H, W]``)."""
        shape = (1, *item["clean_latent"].shape)
        ids = torch.tensor([position])
        draws = {"video": _squeeze(self.keyed(shape, ids, DRAW_STREAM).tensors()),
                 "caption_dropped": self.captions_dropped(ids)[0]}
        if self.cfg.image_loss_weight > 0:
            draws["image"] = _squeeze(self.keyed((1, 1, *shape[2:]), ids, IMAGE_STREAM).tensors())
        return {"draws": draws}

    def keyed(self, shape: tuple, sample_ids: torch.Tensor, stream: int,
              dtype: torch.dtype = torch.float32) -> DiffusionDraw:
        """The draws of ``len(sample_ids)`` samples of ``shape[1:]`` (on the CPU), each from its own generator."""
        gens = sample_generators(self.cfg.seed, sample_ids, stream)
        draws = [self.draw((1, *shape[1:]), g, dtype=dtype) for g in gens]
        return DiffusionDraw(**{name: torch.cat([d.tensors()[name] for d in draws]) for name in draws[0].tensors()})

    def captions_dropped(self, sample_ids: torch.Tensor) -> list[bool]:
        """Whether each sample's caption is replaced by ``""`` (probability ``caption_dropout``; no draw at 0)."""
        p = self.cfg.caption_dropout
        if p <= 0:
            return [False] * len(sample_ids)
        uniform = torch.cat([torch.rand(1, generator=g) for g in sample_generators(self.cfg.seed, sample_ids,
                                                                                   CAPTION_STREAM)])
        return (uniform < p).tolist()   # rand lies in [0, 1): p = 1 drops every caption

    def draw(self, shape: tuple, generator: torch.Generator | None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> DiffusionDraw:
        """Draws for a batch of ``shape [B, F, C, H, W]`` from ``generator`` (None: ``device``'s global RNG)."""
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


def _blank(prompts: list[str], dropped: list[bool]) -> list[str]:
    """``prompts`` with each dropped caption replaced by ``""``."""
    return ["" if d else text for text, d in zip(prompts, dropped)]


def _squeeze(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One sample's draws without the batch dimension (the DataLoader stacks them again)."""
    return {name: value[0] for name, value in tensors.items()}


class DiffusionObjective(Objective):
    """Stage-1 objective (``trainer: diffusion``); ``num_workers`` DataLoader processes read the LMDB."""

    def __init__(self, cfg: Config, num_workers: int = 2):
        _check_config(cfg)
        self.cfg = cfg
        self.scheduler = build_scheduler(cfg)
        self.draws = SampleDraws(cfg, self.scheduler)
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
        per_sample = self.draws if cfg.draws_in_workers else None
        batches = ResumableBatches(dataset, sampler, cfg.batch_size, self.num_workers, per_sample=per_sample)
        return self.data_position.attach(batches)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings ``[B, text_len, text_dim]`` float32 on the training device (one encoder call)."""
        return self.networks.frozen["text_encoder"].encode(list(prompts)).to(self.device, torch.float32)

    def drop_captions(self, prompts: list[str], sample_ids: torch.Tensor | None = None) -> list[str]:
        """``prompts``, each replaced by ``""`` with probability ``caption_dropout`` (one draw from the prompt's
        generator keyed by ``sample_ids``, else the global CPU RNG; none at probability 0)."""
        if self.cfg.caption_dropout <= 0:
            return list(prompts)
        if sample_ids is not None:
            dropped = self.draws.captions_dropped(sample_ids)
        else:
            dropped = (torch.rand(len(prompts)) < self.cfg.caption_dropout).tolist()
        return _blank(prompts, dropped)

    def draw(self, x0: torch.Tensor, sample_ids: torch.Tensor | None = None,
             stream: int = DRAW_STREAM) -> DiffusionDraw:
        """Noise and timesteps for ``x0 [B, F, C, H, W]`` (training.md §3.3), each sample from its own CPU generator
        seeded by ``(seed, sample_ids[i], stream)`` (independent of batch, rank, world size and device), else the
        global RNG of ``x0``'s device. With ``draws_in_workers`` the loop's batches bring them, made by the DataLoader
        workers."""
        if sample_ids is None:
            return self.draws.draw(x0.shape, None, x0.device, x0.dtype)
        draws = self.draws.keyed(x0.shape, sample_ids, stream, x0.dtype)
        if x0.device.type == "cuda":   # pinned: the copy does not wait for the GPU's queue
            draws = DiffusionDraw(**{name: value.pin_memory() for name, value in draws.tensors().items()})
        return draws.to(x0.device)

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
        made = batch.get("draws")             # ... and with them the draws their DataLoader workers made
        if made is not None:
            prompts = _blank(batch["prompts"], made["caption_dropped"].tolist())
            draw = DiffusionDraw(**made["video"]).to(self.device)
        else:
            prompts, draw = self.drop_captions(batch["prompts"], sample_ids), self.draw(x0, sample_ids)
        context = self.encode_prompts(prompts)
        generator = self.networks.trainable["generator"]
        loss, mse = self.denoising_loss(generator, x0, context, draw)
        metrics = {"loss": loss.detach(), **self._bucket_metrics(mse.detach(), draw.t)}
        if self.cfg.image_loss_weight > 0:
            # Latent frame 0 is what the causal VAE makes of pixel frame 0 alone: an image's latent, denoised alone.
            image = x0[:, :1]
            image_draw = DiffusionDraw(**made["image"]).to(self.device) if made is not None else \
                self.draw(image, sample_ids, IMAGE_STREAM)
            image_loss, _ = self.denoising_loss(generator, image, context, image_draw)
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
