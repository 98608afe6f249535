"""Stage 2a: causal ODE regression ``E_j || x̂0_θ(x_{t_j}, t_j ; c) − y ||²`` (training.md §4.6; docs/stage2.md),
and the plumbing Stage 2b shares. An ODE row ``[S + 2, F, C, H, W]`` holds the teacher's states at the ``S`` warped
steps of ``denoising_step_list``, the ODE output ``y`` and the ground truth ``c`` (the teacher-forcing context); ``j``
is one per sample (the reference) or, with ``per_block_steps``, one per block (Self Forcing's choice)."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from pipeline import components
from pipeline.causal import StepSchedule
from trainer.batches import DataPosition, ResumableBatches
from trainer.objective import Networks, Objective
from utils.config import Config
from utils.datasets import ODERegressionLMDBDataset, ResumableSampler
from utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class Stage2Objective(Objective):
    """What the two Stage-2 objectives share: one generator phase, LMDB data and prompt conditioning. Their draws
    come from the global torch RNG, which the loop seeds per rank and checkpoints."""

    dataset_cls: type = ODERegressionLMDBDataset

    def __init__(self, cfg: Config, num_workers: int | None = None):
        if cfg.data_path is None:
            raise ConfigError(f"trainer {cfg.trainer} needs data_path (an LMDB)")
        self.cfg = cfg
        # Workers decode LMDB rows ahead of the GPU; on the CPU (tests) they would only cost start-up time.
        self.num_workers = (2 if torch.cuda.is_available() else 0) if num_workers is None else num_workers
        self.scheduler = components.build_scheduler(cfg)
        self._negative: torch.Tensor | None = None
        self.data_position = DataPosition()

    def _build_generator(self, device: torch.device) -> torch.nn.Module:
        if self.cfg.generator_ckpt is None:
            log.warning("generator_ckpt is not set: Stage 2 starts from the %s folder weights, not a Stage-1 model",
                        self.cfg.generator_name)
        gen = components.build_generator(self.cfg, self.cfg.generator_ckpt, device=device)
        return gen.requires_grad_(True).train()   # gradient checkpointing is the loop's (applied from outside)

    def _build_text_encoder(self, device: torch.device):
        # fp32 like the reference (and like the ODE data); the loop shards it, with CPU offload if configured.
        return components.build_text_encoder(self.cfg, device=device, dtype=torch.float32,
                                             output_device=device).requires_grad_(False)

    def data(self, rank: int, world_size: int, seed: int) -> Iterator[Any]:
        dataset = self.dataset_cls(self.cfg.data_path, self.cfg.max_pair)
        self._check_dataset(dataset)
        sampler = ResumableSampler(dataset, seed=seed, num_replicas=world_size, rank=rank)
        if len(sampler) == 0:
            raise DataError(f"{len(dataset)} samples cannot feed {world_size} ranks")
        return self.data_position.attach(ResumableBatches(dataset, sampler, self.cfg.batch_size, self.num_workers))

    def _check_dataset(self, dataset) -> None:
        dataset.check_latent_shape(self.cfg.image_or_video_shape[1:])

    def encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Prompt embeddings ``[B, L, text_dim]``, float32 on ``device``. Calling the module (not ``.encode``) lets a
        sharded encoder run its root hooks."""
        return self.networks.frozen["text_encoder"](list(prompts)).to(device, torch.float32)

    def negative(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The negative prompt's embeddings, encoded once, expanded to ``batch_size``."""
        if self._negative is None or self._negative.device != device:
            self._negative = self.encode([self.cfg.negative_prompt], device)
        return self._negative.expand(batch_size, -1, -1)


class ODEObjective(Stage2Objective):
    """Causal ODE regression (``trainer: ode``); ``per_block_steps`` has no config key yet."""

    def __init__(self, cfg: Config, per_block_steps: bool = False, num_workers: int | None = None):
        super().__init__(cfg, num_workers)
        if cfg.denoising_step_list is None:
            raise ConfigError("trainer ode needs denoising_step_list (the student's few-step schedule)")
        schedule = StepSchedule.from_config(self.scheduler, cfg.denoising_step_list, warp=cfg.warp_denoising_step)
        self.timesteps = torch.tensor(schedule.timesteps, dtype=torch.float32)   # [S]
        self.per_block_steps = per_block_steps

    def build_networks(self, device: torch.device) -> Networks:
        return Networks(trainable={"generator": self._build_generator(device)},
                        frozen={"text_encoder": self._build_text_encoder(device)})

    def _check_dataset(self, dataset) -> None:
        super()._check_dataset(dataset)
        slots = dataset.row_shape[0]
        if slots != len(self.timesteps) + 2:
            raise DataError(f"{self.cfg.data_path}: rows hold {slots} trajectory slots, but denoising_step_list has "
                            f"{len(self.timesteps)} steps (expected {len(self.timesteps) + 2} slots)")

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE between the generator's x̂0 at a trajectory state and the ODE output (fp32)."""
        gen = self.networks.trainable["generator"]
        device = next(gen.parameters()).device
        ode = batch["ode_latent"].to(device, non_blocking=True)               # [B, S + 2, F, C, H, W]
        b, f = ode.shape[0], ode.shape[2]
        num_steps = len(self.timesteps)
        j = self.scheduler.sample_block_indices(
            b, f, gen.num_frame_per_block, 0, num_steps, uniform=not self.per_block_steps,
            independent_first_frame=self.cfg.independent_first_frame).to(device)                    # [B, F]
        index = j[:, None, :, None, None, None].expand(-1, 1, -1, *ode.shape[3:])
        x = torch.gather(ode[:, :num_steps], 1, index)[:, 0]                 # [B, F, C, H, W]
        t = self.timesteps.to(device)[j]                                     # [B, F]
        context = self.encode(batch["prompts"], device)
        flow = gen.forward_teacher_forcing(x, t, context, clean_x=ode[:, -1])
        pred = self.scheduler.flow_to_x0(flow.float(), x.float(), t)
        loss = F.mse_loss(pred, ode[:, -2].float())
        return loss, {"loss": loss.detach(), "timestep": t.mean()}
