"""Stage 2b: causal consistency distillation (training.md §5; docs/stage2.md), needing only ground-truth latents.

On the ``discrete_cd_N``-step Euler grid ``T_0 = 1000 > ... > T_{N-1}`` (shift ``timestep_shift``), per sample
``n ~ U{0..N-2}``, ``x_n = (1 − σ_n)·x0 + σ_n·ε`` and

    x_{n+1} = x_n + (σ_{n+1} − σ_n)·v_teacher          (one Euler step of the guided teacher)
    L_CD    = || x̂0_θ(x_n, T_n ; x0) − sg[ x̂0_θ⁻(x_{n+1}, T_{n+1} ; x0) ] ||²

every network in teacher-forcing mode on ``x0``. θ⁻, the target, is the loop's EMA of the student (``ema_weight``,
following every step from the start, checkpointed), copied in by :meth:`ConsistencyObjective.ema_updated`.
``σ = t / num_train_timestep`` exactly: the grid is not on the training grid, and all four uses need the same σ."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from model.guidance import cond_uncond_context, guide
from trainer.objective import Networks, Phase
from trainer.ode import Stage2Objective
from utils.config import Config
from utils.datasets import LatentLMDBDataset
from utils.errors import ConfigError


class ConsistencyObjective(Stage2Objective):
    """Student (trained), target (EMA of the student) and teacher (frozen Stage-1 copy)."""

    dataset_cls = LatentLMDBDataset

    def __init__(self, cfg: Config, num_workers: int | None = None):
        super().__init__(cfg, num_workers)
        if not cfg.ema_weight > 0:
            raise ConfigError("consistency_distillation needs ema_weight > 0: the target network is the student's EMA "
                              "(0.99 in the shipped configs)")
        self.grid = self.scheduler.inference_timesteps(cfg.discrete_cd_N, cfg.timestep_shift)   # [N] float32

    def build_networks(self, device: torch.device) -> Networks:
        student = self._build_generator(device)
        teacher = copy.deepcopy(student).requires_grad_(False).eval()
        target = copy.deepcopy(student).requires_grad_(False).eval()
        return Networks(trainable={"generator": student},
                        frozen={"teacher": teacher, "target": target, "text_encoder": self._build_text_encoder(device)})

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Exact σ of timesteps ``[B, F]``, shaped to broadcast over ``[B, F, C, H, W]``."""
        return (t / self.cfg.num_train_timestep)[..., None, None, None]

    def x0_from_flow(self, flow: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 = x_t − σ·v in float32."""
        return x.float() - self.sigma(t) * flow.float()

    def phases(self) -> list[Phase]:
        (phase,) = super().phases()
        phase.ema_from_start = True
        return [phase]

    @torch.no_grad()
    def ema_updated(self, phase: str, ema, step: int) -> None:
        """The loop created, updated or restored its EMA of the student: the target network becomes it."""
        if phase == "generator":
            ema.copy_to(self.networks.frozen["target"])

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, context: torch.Tensor,
                     clean: torch.Tensor) -> torch.Tensor:
        """One guided Euler step of the teacher from ``t`` to ``t_next`` (all ``[B, F]``), cond + uncond batched."""
        teacher = self.networks.frozen["teacher"]
        g = self.cfg.guidance_scale
        if g == 1.0:
            flow = teacher.forward_teacher_forcing(x, t, context, clean_x=clean).float()
        else:
            neg = self.negative(x.shape[0], x.device)
            both = teacher.forward_teacher_forcing(torch.cat([x, x]), torch.cat([t, t]),
                                                   cond_uncond_context(context, neg),
                                                   clean_x=torch.cat([clean, clean])).float()
            flow = guide(*both.chunk(2), g)
        return x + (self.sigma(t_next) - self.sigma(t)) * flow

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Consistency loss of one micro-batch (fp32 loss; timesteps never quantised)."""
        student = self.networks.trainable["generator"]
        device = next(student.parameters()).device
        x0 = batch["clean_latent"].to(device, non_blocking=True).float()     # [B, F, C, H, W]
        b, f = x0.shape[:2]
        n = torch.randint(0, len(self.grid) - 1, (b,))
        t = self.grid[n][:, None].expand(b, f).to(device)                    # [B, F]
        t_next = self.grid[n + 1][:, None].expand(b, f).to(device)
        noise = torch.randn_like(x0)
        x_t = (1 - self.sigma(t)) * x0 + self.sigma(t) * noise
        context = self.encode(batch["prompts"], device)
        x_next = self.teacher_step(x_t, t, t_next, context, x0)
        with torch.no_grad():
            target_flow = self.networks.frozen["target"].forward_teacher_forcing(x_next, t_next, context, clean_x=x0)
            target = self.x0_from_flow(target_flow, x_next, t_next)
        pred = self.x0_from_flow(student.forward_teacher_forcing(x_t, t, context, clean_x=x0), x_t, t)
        loss = F.mse_loss(pred, target)
        return loss, {"loss": loss.detach(), "timestep": t.mean()}
