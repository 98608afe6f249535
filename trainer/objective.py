"""The interface between the shared training loop (trainer/loop.py) and one stage's objective."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from trainer.batches import DataPosition
from utils.datasets import ResumableSampler


@dataclass
class Phase:
    """One optimizer of an objective: the network it updates and its AdamW settings."""

    name: str                       # "generator" or "critic"
    lr: float
    betas: tuple[float, float]
    max_grad_norm: float
    ema: bool = False               # keep an EMA of this network (generator only in every shipped stage)
    # The EMA starts from the initial weights and follows every step; ema_start_step then only decides from when the
    # release export holds it (consistency distillation's target network, training.md §5.1).
    ema_from_start: bool = False

    @classmethod
    def generator(cls, cfg) -> "Phase":
        """The generator's phase as every stage configures it (``lr``, ``beta1/2``, ``max_grad_norm_generator``)."""
        return cls("generator", cfg.lr, (cfg.beta1, cfg.beta2), cfg.max_grad_norm_generator, ema=cfg.ema_weight > 0)


@dataclass
class Networks:
    """Every network of an objective, by role. ``trainable`` names match the phases' names."""

    trainable: dict[str, nn.Module]
    frozen: dict[str, nn.Module] = field(default_factory=dict)   # teacher / real score / text encoder ...


class Objective(ABC):
    """Base class of a stage objective."""

    # True: every phase due at a step draws its own micro-batches (DMD: the generator and the critic see different
    # prompts, as in the reference); False: the phases of a step share them.
    fresh_batch_per_phase: bool = False
    # The position of data() (a DataPosition of its ResumableBatches, or a sampler read without DataLoader workers);
    # the default data_state/load_data_state go through it.
    data_position: Optional[DataPosition | ResumableSampler] = None

    @abstractmethod
    def build_networks(self, device: torch.device) -> Networks:
        """Build (and load initial weights of) every network, unsharded, on ``device`` or ``meta``."""

    def frame_weights(self, num_frames: int, device: torch.device) -> torch.Tensor:
        """Per-latent-frame loss weights ``[F]``, mean 1: ``first_frame_loss_weight`` for frame 0, equal elsewhere."""
        w = torch.ones(num_frames, device=device)
        w[0] = self.cfg.first_frame_loss_weight
        return w * (num_frames / w.sum())

    def phases(self) -> list[Phase]:
        """All optimizer phases of this objective (by default the generator's alone)."""
        return [Phase.generator(self.cfg)]

    def phases_at(self, step: int) -> list[str]:
        """Names of the phases that update at ``step``, in order (DMD: generator every k steps, critic always)."""
        return [p.name for p in self.phases()]

    @abstractmethod
    def data(self, rank: int, world_size: int, seed: int) -> Iterator[Any]:
        """An infinite iterator of per-rank micro-batches, resumable through :meth:`data_state`. The loop calls it
        once, after :meth:`attach` and before :meth:`load_data_state`."""

    def data_state(self) -> dict:
        """This rank's data position, read back with ``weights_only=True``: tensors, numbers, strings and containers."""
        return self.data_position.state_dict() if self.data_position is not None else {}

    def load_data_state(self, state: dict) -> None:
        """Restore :meth:`data_state` on resume (not called when the world size changed)."""
        if self.data_position is not None:
            self.data_position.load_state_dict(state)

    @abstractmethod
    def loss(self, phase: str, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch for ``phase`` and metrics (tensors, read only on log steps); ``step`` is 0-based.
        Moving the batch to the device is the objective's job."""

    def ema_updated(self, phase: str, ema: Any, step: int) -> None:
        """Called after the EMA (:class:`utils.ema.ShardLocalEMA`) of ``phase`` was created, updated or restored."""

    def attach(self, networks: Networks) -> None:
        """Receive the (possibly sharded) networks the loop will train; called once before the first step."""
        self.networks = networks
