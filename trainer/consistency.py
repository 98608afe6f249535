"""Stage 2b: causal consistency distillation (training.md §5), an alternative to ODE regression that needs only
ground-truth latents.

Grid ``T_0 = 1000 > T_1 > ... > T_{N-1}``: the ``discrete_cd_N``-step Euler grid with shift ``timestep_shift``. Per
sample, ``n ~ U{0..N-2}`` (one value for all frames), ``ε ~ N(0, I)``, ``x_n = (1 − σ_n)·x0 + σ_n·ε`` and

    x_{n+1} = x_n + (σ_{n+1} − σ_n)·v_teacher          (one Euler step of the guided teacher,
                                                         v = v_u + g·(v_c − v_u))
    L_CD    = || x̂0_θ(x_n, T_n ; x0) − sg[ x̂0_θ⁻(x_{n+1}, T_{n+1} ; x0) ] ||²

with every network in teacher-forcing mode on the ground truth ``x0``. θ is the student, θ⁻ the target network (an
EMA of the student with decay ``ema_weight``), the teacher the frozen Stage-1 model. ``σ = t / num_train_timestep``
exactly: the grid's timesteps are not on the 1000-step training grid, and the noising, the teacher's step and both
x̂0 conversions must use the same σ (docs/stage2.md).

The target network is the shared loop's EMA of the student (``Phase(ema=True)``, decay ``ema_weight``), copied into
the ``target`` network whenever the loop updates it (:meth:`ConsistencyObjective.ema_updated`). The reference's EMA
starts at step 0 while the loop's starts at ``ema_start_step``; until then the objective keeps the target itself with
the same update, and hands its history to the loop's EMA when that is created, so the target is exactly the
reference's at every step. Without a loop (tests, ``ema_weight: 0``) the objective's own update runs throughout.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from model.guidance import cond_uncond_context, guide
from trainer.objective import Networks
from trainer.ode import Stage2Objective, device_of
from utils.config import Config
from utils.datasets import LatentLMDBDataset
from utils.ema import canonical_name
from utils.errors import ConfigError

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (a view), or the tensor itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


class ConsistencyObjective(Stage2Objective):
    """Causal consistency distillation: student (trained), target (EMA of the student), teacher (frozen Stage-1).

    Args:
        cfg: a ``trainer: consistency_distillation`` config (``discrete_cd_N``, ``guidance_scale``, ``ema_weight``).
        num_workers: DataLoader workers (default 2 with CUDA, else 0).
    """

    dataset_cls = LatentLMDBDataset

    def __init__(self, cfg: Config, num_workers: int | None = None):
        super().__init__(cfg, num_workers)
        if not cfg.is_causal:
            raise ConfigError("consistency_distillation trains a causal student: set is_causal: true")
        self.grid = self.scheduler.inference_timesteps(cfg.discrete_cd_N, cfg.timestep_shift)   # [N] float32
        self.decay = cfg.ema_weight
        self._target_step: int | None = None    # last step the objective's own target update ran
        self._loop_ema = None                   # the loop's ShardLocalEMA of the student, once it exists

    def build_networks(self, device: torch.device) -> Networks:
        student = self._build_generator(device)
        teacher = copy.deepcopy(student).requires_grad_(False).eval()
        target = copy.deepcopy(student).requires_grad_(False).eval()
        teacher.enable_gradient_checkpointing(False)
        target.enable_gradient_checkpointing(False)
        return Networks(trainable={"generator": student},
                        frozen={"teacher": teacher, "target": target,
                                "text_encoder": self._build_text_encoder(device)})

    # ------------------------------------------------------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Exact σ of timesteps ``[B, F]``, shaped to broadcast over ``[B, F, C, H, W]``."""
        return (t / self.cfg.num_train_timestep)[..., None, None, None]

    def x0_from_flow(self, flow: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 = x_t − σ·v in float32."""
        return x.float() - self.sigma(t) * flow.float()

    # ------------------------------------------------------------------------------------------------------------
    # the target network
    def _params(self, role: str) -> dict[str, torch.Tensor]:
        """Local shards of the ``generator`` (student) or ``target`` parameters by canonical name."""
        nets = self.networks.trainable if role == "generator" else self.networks.frozen
        return {canonical_name(n): _local(p.detach()) for n, p in nets[role].named_parameters()}

    def _lerp_target(self) -> dict[str, torch.Tensor]:
        """target <- decay * target + (1 - decay) * student; returns the target's tensors."""
        target, student = self._params("target"), self._params("generator")
        torch._foreach_lerp_([target[n] for n in student], [p.float() for p in student.values()], 1.0 - self.decay)
        return target

    @torch.no_grad()
    def update_target(self, step: int) -> None:
        """Own EMA step of the target for a new optimizer ``step`` while the loop keeps no EMA: at the first
        micro-batch of step s it folds in the student after step s - 1, as the reference's shadow did.

        A run resumed at ``step > 0`` without a loop EMA has no target to resume from: it restarts from the student.
        """
        if self._loop_ema is not None or (self._target_step is not None and step <= self._target_step):
            return
        if self._target_step is not None:
            self._lerp_target()
        elif step > 0:
            log.warning("consistency target restarts from the student's weights at step %d", step)
            target, student = self._params("target"), self._params("generator")
            torch._foreach_copy_([target[n] for n in student], list(student.values()))
        self._target_step = step

    @torch.no_grad()
    def ema_updated(self, phase: str, ema, step: int) -> None:
        """The loop created, updated or restored its EMA of the student: the target becomes it.

        When the EMA is created during this run (``ema_start_step`` reached), its shadow first takes the target's
        history plus this step's update, so it equals the reference's EMA, which started at step 0. (On resume the
        loop restores the EMA before any loss, and the target simply takes it.)
        """
        if phase != "generator":
            return
        if ema is not self._loop_ema and self._target_step is not None:
            target = self._lerp_target()
            torch._foreach_copy_([_local(v) for v in ema.shadow.values()], [target[n] for n in ema.shadow])
        self._loop_ema = ema
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
            neg = self.text.negative(self.networks.frozen["text_encoder"], x.shape[0], x.device)
            both = teacher.forward_teacher_forcing(torch.cat([x, x]), torch.cat([t, t]),
                                                   cond_uncond_context(context, neg),
                                                   clean_x=torch.cat([clean, clean])).float()
            flow = guide(*both.chunk(2), g)
        return x + (self.sigma(t_next) - self.sigma(t)) * flow

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Consistency loss of one micro-batch (fp32 loss; timesteps never quantised)."""
        self.update_target(step)
        student = self.networks.trainable["generator"]
        device = device_of(student)
        x0 = batch["clean_latent"].to(device, non_blocking=True).float()     # [B, F, C, H, W]
        b, f = x0.shape[:2]
        n = torch.randint(0, len(self.grid) - 1, (b,))
        t = self.grid[n][:, None].expand(b, f).to(device)                    # [B, F]
        t_next = self.grid[n + 1][:, None].expand(b, f).to(device)
        noise = torch.randn_like(x0)
        x_t = (1 - self.sigma(t)) * x0 + self.sigma(t) * noise
        context = self.text(self.networks.frozen["text_encoder"], batch["prompts"], device)
        x_next = self.teacher_step(x_t, t, t_next, context, x0)
        with torch.no_grad():
            target_flow = self.networks.frozen["target"].forward_teacher_forcing(x_next, t_next, context, clean_x=x0)
            target = self.x0_from_flow(target_flow, x_next, t_next)
        pred = self.x0_from_flow(student.forward_teacher_forcing(x_t, t, context, clean_x=x0), x_t, t)
        loss = F.mse_loss(pred, target)
        return loss, {"loss": loss.detach(), "timestep": t.mean()}
