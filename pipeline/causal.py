"""The per-block loop of causal generation, written once.

Streaming inference, the self-forcing rollout of Stage 3, causal ODE trajectories of Stage 2 and multi-step sampling
of Stage-1 models all run :class:`BlockLoop`: for each block, denoise its noise through the KV cache with a list of
timesteps, then run one *context pass* that writes the block's clean latents into the cache for the blocks after it
(model_and_inference.md §9.1). What differs between those uses is data, not code:

* the step rule: ``"renoise"`` (few-step generators: predict x0, add fresh noise at the next timestep), or an ODE
  solver for many-step models: ``"euler"`` (``x + v·(σ_next − σ)``) or ``"unipc"`` (Wan's multistep UniPC,
  :mod:`model.unipc`; its history lives in a solver object made afresh for each block);
* classifier-free guidance: a negative context and a scale; conditional and unconditional halves run as one batch
  of ``2B`` against one cache of batch ``2B``;
* which latents the context pass writes: the block's own prediction (generation), or given ones (teacher-forced ODE
  trajectories with ground-truth context, I2V prefill);
* an :class:`ExitPolicy` for the rollout: the step at which a block stops, and whether that step keeps gradients.

Every timestep here is a Python float and every position a Python int, so the loop never waits on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from model.guidance import cond_uncond_context, guide
from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from model.unipc import UniPCSolver, unipc_grid
from model.wan import CacheMode, WanModel
from utils.config import SAMPLE_SOLVERS

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def randn_like_from(generator: torch.Generator | None) -> NoiseFn:
    """Fresh Gaussian noise shaped like its argument, drawn from ``generator`` (or the global RNG)."""
    return lambda like: torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


RULES = ("renoise", *SAMPLE_SOLVERS)   # few-step re-noising, or an ODE solver for many-step sampling


@dataclass
class StepSchedule:
    """Timesteps (already warped, descending) that denoise each block."""

    timesteps: list[float]
    first_block: list[float] | None = None   # `denoising_step_list_first_chunk`: block 0 only
    rule: str = "renoise"                    # "renoise" (few-step), "euler" or "unipc" (ODE sampling)
    sigmas: list[float] | None = None        # "unipc": the solver's noise level at each timestep (default t / T)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"step rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        self.timesteps = [float(t) for t in self.timesteps]
        if self.first_block is not None:
            self.first_block = [float(t) for t in self.first_block]
        if self.sigmas is not None and (self.rule != "unipc" or len(self.sigmas) != len(self.timesteps)
                                        or self.first_block is not None):
            raise ValueError("sigmas go with rule 'unipc', one per timestep, and one step list for every block")

    def for_block(self, index: int) -> list[float]:
        return self.first_block if index == 0 and self.first_block is not None else self.timesteps

    def solver(self, steps: list[float], num_train_timesteps: int) -> UniPCSolver | None:
        """A fresh solver for one block's run (``"unipc"``; None for the rules that keep no history)."""
        if self.rule != "unipc":
            return None
        return UniPCSolver(self.sigmas if self.sigmas is not None else [t / num_train_timesteps for t in steps])

    @classmethod
    def from_config(cls, scheduler: FlowMatchScheduler, steps: Sequence[int], first: Sequence[int] | None = None,
                    warp: bool = True) -> "StepSchedule":
        """Build from the config's nominal lists (``denoising_step_list``), warped onto the training grid."""
        def conv(lst):
            lst = [s for s in lst if s != 0]  # a trailing 0 is dropped, as the reference's pipelines do
            return scheduler.warp_steps(lst).tolist() if warp else [float(s) for s in lst]
        return cls(conv(steps), conv(first) if first else None)

    @classmethod
    def multistep(cls, scheduler: FlowMatchScheduler, num_steps: int, shift: float, solver: str) -> "StepSchedule":
        """Many-step ODE sampling: ``"unipc"`` on Wan's grid (:func:`model.unipc.unipc_grid`, as the published
        Stage-1 and bidirectional pipelines sample), or ``"euler"`` on the shifted flow-matching grid."""
        if solver not in SAMPLE_SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SAMPLE_SOLVERS)}, got {solver!r}")
        if solver == "euler":
            return cls(scheduler.inference_timesteps(num_steps, shift).tolist(), rule="euler")
        timesteps, sigmas = unipc_grid(num_steps, shift, scheduler.num_train_timesteps)
        return cls(timesteps, rule="unipc", sigmas=sigmas)


@dataclass
class ExitPolicy:
    """Where each block's denoising stops and whether that last forward keeps gradients (self-forcing rollout)."""

    exit_step: int | None = None            # index into the block's list; None = the last step
    first_block_exit_step: int | None = None
    grad_on_exit: bool = False
    grad_from_frame: int = 0                # only blocks starting at or after this frame get gradients

    def exit_for(self, block_index: int, num_steps: int) -> int:
        step = self.first_block_exit_step if block_index == 0 and self.first_block_exit_step is not None \
            else self.exit_step
        return num_steps - 1 if step is None else min(step, num_steps - 1)


@dataclass
class Guidance:
    """Text conditioning of a loop: the prompt context and, for CFG, a negative context and scale."""

    context: torch.Tensor                       # [B, L, text_dim]
    negative: torch.Tensor | None = None        # [B, L', text_dim]
    scale: float = 1.0

    @property
    def batched(self) -> bool:
        return self.negative is not None and self.scale != 1.0

    def model_context(self) -> torch.Tensor:
        """The context the model sees: the prompt's, or ``[context ; negative]`` (``2B``) when guided."""
        return cond_uncond_context(self.context, self.negative) if self.batched else self.context


@dataclass
class BlockLoop:
    """One model, one cache, one schedule: generates blocks in order (see the module docstring)."""

    model: WanModel
    scheduler: FlowMatchScheduler
    schedule: StepSchedule
    guidance: Guidance
    cache: KVCache
    context_noise: float = 0.0
    noise_fn: NoiseFn = field(default_factory=lambda: randn_like_from(None))

    fuse_context: bool = False   # run each context pass inside the next block's first step (inference only)

    # ------------------------------------------------------------------------------------------------------------
    def flow(self, x: torch.Tensor, t: float | torch.Tensor, start_frame: int, blocks: tuple[int, ...] = (),
             grad: bool = False) -> torch.Tensor:
        """Guided flow prediction for frames ``x [B, n, C, H, W]`` at timestep ``t`` (a float, or ``[B, n]``).

        ``grad``: this forward keeps gradients (the model's rollout mode); otherwise it is an inference forward and
        must run without autograd."""
        tt = t if isinstance(t, torch.Tensor) else self._t(x, t)
        mode = CacheMode.ROLLOUT if grad else CacheMode.INFERENCE
        if not self.guidance.batched:
            return self.model.forward_cached(x, tt, self.guidance.context, self.cache, start_frame, mode=mode,
                                             blocks=blocks)
        out = self.model.forward_cached(torch.cat([x, x]), torch.cat([tt, tt]), self.guidance.model_context(),
                                        self.cache, start_frame, mode=mode, blocks=blocks)
        return guide(*out.chunk(2), self.guidance.scale)

    def _context_input(self, latents: torch.Tensor, t: float) -> torch.Tensor:
        x = latents.detach()
        if t > 0:  # at 0 the latents go in exactly clean (see commit)
            x = self.scheduler.add_noise(x, self.noise_fn(x), self._t(x, t))
        return x

    def _first_flow(self, x: torch.Tensor, t: float, start_frame: int, pending, grad: bool) -> torch.Tensor:
        """Flow of a block's first step, running the previous block's due context pass first -- or, when allowed,
        in the same forward (one call of twice the tokens instead of two calls)."""
        if pending is None:
            return self.flow(x, t, start_frame, grad=grad)
        latents, prev_start = pending
        m = latents.shape[1]
        if self.fuse_context and not grad and self.cache.can_fuse(prev_start, m + x.shape[1]):
            ctx = self._context_input(latents, self.context_noise)
            tt = torch.cat([self._t(ctx, self.context_noise), self._t(x, t)], dim=1)
            return self.flow(torch.cat([ctx, x], 1), tt, prev_start, blocks=(m, x.shape[1]))[:, m:]
        self.commit(latents, prev_start)
        return self.flow(x, t, start_frame, grad=grad)

    def denoise(self, noise: torch.Tensor, start_frame: int, block_index: int, policy: ExitPolicy | None = None,
                record: Callable[[int, torch.Tensor], None] | None = None,
                pending: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """Denoise one block from ``noise``; returns its clean prediction (x0) ``[B, n, C, H, W]``.

        ``pending`` = (latents, start_frame) of the previous block whose context pass is still due; it runs before
        (or fused into) this block's first step. ``record(step_index, x)`` sees the state before every step.
        """
        steps = self.schedule.for_block(block_index)
        policy = policy or ExitPolicy()
        last = policy.exit_for(block_index, len(steps))
        grad = policy.grad_on_exit and start_frame >= policy.grad_from_frame
        ode = self.schedule.rule != "renoise"
        solver = self.schedule.solver(steps, self.scheduler.num_train_timesteps)
        x = noise
        for j in range(last + 1):
            if record is not None:
                record(j, x)
            t = steps[j]
            t_next = steps[j + 1] if j + 1 < len(steps) else 0.0
            keep = grad and j == last   # this forward keeps gradients: the model's rollout mode
            with torch.set_grad_enabled(keep):
                flow = self._first_flow(x, t, start_frame, pending, keep) if j == 0 \
                    else self.flow(x, t, start_frame, grad=keep)
                if ode and (j < last or j + 1 == len(steps)):   # an ODE run ends at t = 0 with the clean sample
                    x = solver.step(flow, x) if solver is not None \
                        else self.scheduler.step(flow, self._t(x, t), x, self._t(x, t_next))
                    if j == last:
                        return x
                    continue
                x0 = self.scheduler.flow_to_x0(flow, x, self._t(x, t))
            if j == last:
                return x0
            x = self.scheduler.add_noise(x0, self.noise_fn(x0), self._t(x, t_next))
        raise AssertionError("unreachable")

    @staticmethod
    def _t(x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.full(x.shape[:2], t, device=x.device, dtype=torch.float32)

    @torch.no_grad()
    def commit(self, latents: torch.Tensor, start_frame: int, timestep: float | None = None) -> None:
        """Context pass: write ``latents`` (the block's clean frames) into the cache.

        The timestep is ``context_noise`` unless given. With ``context_noise > 0`` the latents are first noised to
        it; at 0 they go in exactly clean (the reference's rollout nudged them by the smallest grid sigma even at 0;
        its inference did not -- we do the same in both).
        """
        t = self.context_noise if timestep is None else timestep
        self.flow(self._context_input(latents, t), t, start_frame)

    def _blocks_from(self, start_frame: int, num_frames: int) -> list[int]:
        """Sizes of the blocks covering frames ``start_frame .. start_frame+num_frames-1``."""
        sizes = self.model.layout.block_sizes(start_frame + num_frames)
        frame = 0
        for i, n in enumerate(sizes):
            if frame == start_frame:
                return sizes[i:]
            frame += n
        raise ValueError(f"start_frame {start_frame} is not a block boundary")

    def run(self, noise: torch.Tensor, start_frame: int = 0, block_index: int = 0,
            policy: ExitPolicy | None = None, context_latents: torch.Tensor | None = None,
            commit_last: bool = True, record: Callable[[int, int, torch.Tensor], None] | None = None,
            ) -> Iterator[tuple[int, torch.Tensor]]:
        """Generate the blocks of ``noise [B, F, C, H, W]``; yields ``(start_frame, x0 [B, n, C, H, W])`` per block.

        ``block_index`` numbers the first generated block (block 0 uses the first-block step list).
        ``context_latents`` (same shape as noise) replace the predictions in the context pass (teacher-forced
        trajectories). Each block's context pass runs at the start of the next block (fused into its first step
        when ``fuse_context``); ``commit_last`` also runs the last one (nothing in this loop reads it).
        ``record(block_start, step_index, x)`` sees every pre-step state.
        """
        offset, frame, pending = 0, start_frame, None
        for i, n in enumerate(self._blocks_from(start_frame, noise.shape[1])):
            rec = (lambda j, x, f=frame: record(f, j, x)) if record is not None else None
            x0 = self.denoise(noise[:, offset:offset + n], frame, block_index + i, policy, rec, pending)
            yield frame, x0
            pending = (x0 if context_latents is None else context_latents[:, offset:offset + n], frame)
            offset += n
            frame += n
        if commit_last and pending is not None:
            self.commit(*pending)

    @torch.no_grad()
    def prefill(self, latents: torch.Tensor, start_frame: int = 0) -> int:
        """Write given clean latents (an image's or a clip's) at t = 0, block by block; returns the next frame."""
        offset = 0
        for n in self._blocks_from(start_frame, latents.shape[1]):
            self.commit(latents[:, offset:offset + n], start_frame + offset, timestep=0.0)
            offset += n
        return start_frame + offset
