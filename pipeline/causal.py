"""The per-block loop of causal generation, written once (docs/architecture.md, "One block loop"): streaming, the
Stage-3 rollout and many-step sampling run :class:`BlockLoop` with different data. Timesteps are Python floats and
positions Python ints, so the loop never waits on the GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from model.guidance import cond_uncond_context, guide
from model.kv_cache import FULL, SCRATCH, CacheView, KVCache
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
        """Many-step ODE sampling: ``"unipc"`` on Wan's grid (as the published pipelines), or ``"euler"`` on the
        shifted flow-matching grid (another name: ValueError from the rule check)."""
        if solver == "euler":
            return cls(scheduler.inference_timesteps(num_steps, shift).tolist(), rule="euler")
        timesteps, sigmas = unipc_grid(num_steps, shift, scheduler.num_train_timesteps)
        return cls(timesteps, rule=solver, sigmas=sigmas)


@dataclass
class ExitPolicy:
    """Where each block's denoising stops and whether that last forward keeps gradients (self-forcing rollout)."""

    exit_step: int | tuple[int, ...] | None = None   # index into the block's list, or one per block; None = the last
    first_block_exit_step: int | None = None         # block 0's (with a shared exit_step)
    grad_on_exit: bool = False
    grad_from_frame: int = 0                # only blocks starting at or after this frame get gradients

    def exit_for(self, block_index: int, num_steps: int) -> int:
        if isinstance(self.exit_step, tuple):
            step = self.exit_step[block_index] if block_index < len(self.exit_step) else None
        elif block_index == 0 and self.first_block_exit_step is not None:
            step = self.first_block_exit_step
        else:
            step = self.exit_step
        return num_steps - 1 if step is None else min(step, num_steps - 1)


@dataclass(frozen=True)
class CacheViews:
    """What a denoising forward and a context pass attend to (:class:`~model.kv_cache.CacheView`)."""

    denoise: CacheView = FULL
    context: CacheView = FULL

    @classmethod
    def rolling(cls, span: int) -> "CacheViews":
        """Rolling Forcing's attention (docs/architecture.md, "Rolling windows")."""
        return cls(CacheView(span, sink=True, write=False), CacheView(span, sink=False, write=True))

    @property
    def full(self) -> bool:
        return self.denoise.full and self.context.full


class Window(NamedTuple):
    """One Rolling Forcing window: blocks ``first..last`` denoised together, block ``b`` at step ``index - b``."""

    index: int
    first: int
    last: int

    @property
    def blocks(self) -> range:
        return range(self.first, self.last + 1)


def rolling_windows(num_steps: int, num_blocks: int | None = None) -> Iterator[Window]:
    """The windows of ``num_blocks`` blocks (None: endless): window ``k`` holds blocks ``max(0, k-S+1) .. min(N-1, k)``
    (with fewer than ``S`` blocks each still takes its ``S`` steps)."""
    k = 0
    while num_blocks is None or k < num_blocks + num_steps - 1:
        yield Window(k, max(0, k - num_steps + 1), k if num_blocks is None else min(num_blocks - 1, k))
        k += 1


class WindowResult(NamedTuple):
    """What one window of :meth:`BlockLoop.rolling` produced."""

    window: Window
    x0: torch.Tensor                             # clean predictions of all its blocks [B, n, C, H, W]
    final: tuple[int, torch.Tensor] | None       # (start frame, x0) of the block that became clean, if any


@dataclass
class Guidance:
    """Text conditioning of a loop: the prompt context and, for CFG, a negative context and scale."""

    context: torch.Tensor                       # [B, L, text_dim]
    negative: torch.Tensor | None = None        # [B, L', text_dim]
    scale: float = 1.0

    @property
    def batched(self) -> bool:
        return self.negative is not None and self.scale != 1.0


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
    views: CacheViews = field(default_factory=CacheViews)

    def flow(self, x: torch.Tensor, t: float | torch.Tensor, start_frame: int, blocks: tuple[int, ...] = (),
             grad: bool = False, view: CacheView | None = None) -> torch.Tensor:
        """Guided flow for frames ``x [B, n, C, H, W]`` at ``t`` (a float, or ``[B, n]``); ``grad``: rollout mode
        (keeps gradients), else inference. ``view``: default the denoising view."""
        tt = t if isinstance(t, torch.Tensor) else self._t(x, t)
        mode = CacheMode.ROLLOUT if grad else CacheMode.INFERENCE
        g = self.guidance
        context = g.context
        if g.batched:   # conditional and unconditional halves as one 2B batch
            x, tt, context = torch.cat([x, x]), torch.cat([tt, tt]), cond_uncond_context(context, g.negative)
        out = self.model.forward_cached(x, tt, context, self.cache, start_frame, mode=mode, blocks=blocks,
                                        view=self.views.denoise if view is None else view)
        return guide(*out.chunk(2), g.scale) if g.batched else out

    def _context_input(self, latents: torch.Tensor, t: float) -> torch.Tensor:
        x = latents.detach()
        if t > 0:  # at 0 the latents go in exactly clean (see commit)
            x = self.scheduler.add_noise(x, self.noise_fn(x), self._t(x, t))
        return x

    def _first_flow(self, x: torch.Tensor, t: float, start_frame: int, pending, grad: bool,
                    view: CacheView | None = None) -> torch.Tensor:
        """Flow of a block's first step, after the previous block's due context pass, or fused into one forward."""
        if pending is None:
            return self.flow(x, t, start_frame, grad=grad, view=view)
        latents, prev_start = pending
        m = latents.shape[1]
        if self.fuse_context and self.views.full and not grad and self.cache.can_fuse(prev_start, m + x.shape[1]):
            ctx = self._context_input(latents, self.context_noise)
            tt = torch.cat([self._t(ctx, self.context_noise), self._t(x, t)], dim=1)
            return self.flow(torch.cat([ctx, x], 1), tt, prev_start, blocks=(m, x.shape[1]))[:, m:]
        self.commit(latents, prev_start)
        return self.flow(x, t, start_frame, grad=grad)

    def denoise(self, noise: torch.Tensor, start_frame: int, block_index: int, policy: ExitPolicy | None = None,
                record: Callable[[int, torch.Tensor], None] | None = None,
                pending: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """Denoise one block from ``noise``; returns its x0 ``[B, n, C, H, W]``. ``pending``: (latents, start frame)
        of the previous block's due context pass; ``record(step_index, x)`` sees the state before every step."""
        steps = self.schedule.for_block(block_index)
        policy = policy or ExitPolicy()
        last = policy.exit_for(block_index, len(steps))
        grad = policy.grad_on_exit and start_frame >= policy.grad_from_frame
        ode = self.schedule.rule != "renoise"
        solver = self.schedule.solver(steps, self.scheduler.num_train_timesteps)
        # a video's first block sees no earlier frame: its steps need not store K/V the context pass rewrites
        scratch = SCRATCH if start_frame == 0 and self.views.denoise == FULL else None
        x = noise
        for j in range(last + 1):
            if record is not None:
                record(j, x)
            t = steps[j]
            t_next = steps[j + 1] if j + 1 < len(steps) else 0.0
            keep = grad and j == last   # this forward keeps gradients: the model's rollout mode
            with torch.set_grad_enabled(keep):
                view = None if keep else scratch   # a rollout step keeping gradients runs as before
                flow = self._first_flow(x, t, start_frame, pending, keep, view) if j == 0 \
                    else self.flow(x, t, start_frame, grad=keep, view=view)
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
        """Context pass: write ``latents`` into the cache, noised to ``timestep`` (default ``context_noise``); at 0
        exactly clean (the reference's rollout nudged them by the smallest grid sigma, its inference did not)."""
        t = self.context_noise if timestep is None else timestep
        self.flow(self._context_input(latents, t), t, start_frame, view=self.views.context)

    def _blocks_from(self, start_frame: int, num_frames: int | None) -> Iterator[int]:
        """Sizes of the blocks covering frames ``start_frame .. start_frame+num_frames-1`` (None: endlessly)."""
        layout = self.model.layout
        if num_frames is not None:
            layout.block_sizes(start_frame + num_frames)   # raises if the frames do not tile into blocks
        index, end = layout.block_starting_at(start_frame), start_frame
        while num_frames is None or end < start_frame + num_frames:
            n = layout.block_size(index)
            yield n
            end, index = end + n, index + 1

    def run(self, noise: torch.Tensor, start_frame: int = 0, block_index: int = 0, policy: ExitPolicy | None = None,
            context_latents: torch.Tensor | None = None, commit_last: bool = True,
            record: Callable[[int, int, torch.Tensor], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Generate the blocks of ``noise [B, F, C, H, W]`` (the first numbered ``block_index``); yields ``(start_frame,
        x0)`` per block. ``context_latents`` (shaped as noise) replace the predictions in the context passes;
        ``commit_last`` also runs the last one; ``record(block_start, step_index, x)`` sees every pre-step state."""
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

    def rolling(self, block_noise: Callable[[int, int], torch.Tensor], start_frame: int = 0,
                num_blocks: int | None = None, grad: Callable[[Window, int], bool] | None = None,
                ) -> Iterator[WindowResult]:
        """Rolling Forcing: one :class:`WindowResult` per window. ``block_noise(start_frame, n)``: a block's noise as it
        enters; ``num_blocks`` None: endless; ``grad(window, end_frame)``: whether that window's forward keeps
        gradients."""
        steps = self.schedule.timesteps
        layout = self.model.layout
        index0 = layout.block_starting_at(start_frame)
        starts, states = {0: start_frame}, {}        # block -> start frame; block -> state at its next step
        for w in rolling_windows(len(steps), num_blocks):
            if w.last not in states:                  # a block enters: pure noise at the first step
                n = layout.block_size(index0 + w.last)
                starts[w.last + 1] = starts[w.last] + n
                states[w.last] = block_noise(starts[w.last], n)
            x = torch.cat([states[b] for b in w.blocks], 1)
            t = torch.cat([self._t(states[b], steps[w.index - b]) for b in w.blocks], 1)
            start, end = starts[w.first], starts[w.last + 1]
            keep = grad is not None and grad(w, end)
            with torch.set_grad_enabled(keep):
                x0 = self.scheduler.flow_to_x0(self.flow(x, t, start, grad=keep), x, t)
            final = None
            with torch.no_grad():
                for b in w.blocks:
                    part = x0[:, starts[b] - start:starts[b + 1] - start].detach()
                    step = w.index - b
                    if step + 1 < len(steps):
                        states[b] = self.scheduler.add_noise(part, self.noise_fn(part), self._t(part, steps[step + 1]))
                    else:                              # clean: into the cache, out of the window
                        del states[b], starts[b]
                        self.commit(part, start)
                        final = (start, part)
            yield WindowResult(w, x0, final)

    @torch.no_grad()
    def prefill(self, latents: torch.Tensor, start_frame: int = 0) -> None:
        """Write given clean latents (an image's or a clip's) at t = 0, block by block."""
        offset = 0
        for n in self._blocks_from(start_frame, latents.shape[1]):
            self.commit(latents[:, offset:offset + n], start_frame + offset, timestep=0.0)
            offset += n
