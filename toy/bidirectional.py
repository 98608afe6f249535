"""Sampling the bidirectional Wan model (the teacher, or the toy world's base model): all frames at once.

The :class:`~pipeline.causal.StepSchedule` names the rule: many-step ODE sampling with guidance on the negative
prompt (``"unipc"``, the published 50-step solver, or ``"euler"``), or few-step ``"renoise"``. Unlike the reference's
few-step pipeline, the last listed timestep is evaluated too (model_and_inference.md §15 item 7).
"""

from __future__ import annotations

import torch

from model.guidance import cond_uncond_context, guide
from model.scheduler import FlowMatchScheduler
from model.wan import WanModel
from pipeline.causal import NoiseFn, StepSchedule, randn_like_from


@torch.no_grad()
def sample_bidirectional(model: WanModel, scheduler: FlowMatchScheduler, noise: torch.Tensor,
                         context: torch.Tensor, schedule: StepSchedule, negative: torch.Tensor | None = None,
                         guidance_scale: float = 1.0, noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """Denoise ``noise [B, F, C, H, W]`` over ``schedule.timesteps``: ODE rules integrate the flow to 0,
    ``"renoise"`` re-noises each x0 prediction to the next timestep."""
    noise_fn = noise_fn or randn_like_from(None)
    guided = negative is not None and guidance_scale != 1.0
    timesteps = schedule.timesteps
    solver = schedule.solver(timesteps, scheduler.num_train_timesteps)
    x = noise
    b, f = x.shape[:2]
    x0 = x
    both = cond_uncond_context(context, negative) if guided else None   # [2B, L, D]
    for j, t in enumerate(timesteps):
        tt = torch.full((b, f), float(t), device=x.device)
        if guided:
            flow = guide(*model(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2), guidance_scale)
        else:
            flow = model(x, tt, context)
        t_next = float(timesteps[j + 1]) if j + 1 < len(timesteps) else 0.0
        if solver is not None:
            x = x0 = solver.step(flow, x)
        elif schedule.rule == "euler":
            x = x0 = scheduler.step(flow, tt, x, torch.full((b, f), t_next, device=x.device))
        else:
            x0 = scheduler.flow_to_x0(flow, x, tt)
            if j + 1 < len(timesteps):
                x = scheduler.add_noise(x0, noise_fn(x0), torch.full((b, f), t_next, device=x.device))
    return x0
