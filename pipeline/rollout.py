"""The self-forcing rollout of Stage 3 (training.md §6.3; docs/stage3.md), run by :class:`~pipeline.causal.BlockLoop`.

Each block stops at a drawn *exit step* whose forward alone keeps gradients; a no-grad context pass then caches it,
so gradients never cross steps or blocks. Exit steps are drawn on rank 0 and shared: FSDP ranks run the same forwards.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from model.wan import WanModel
from pipeline.causal import BlockLoop, CacheViews, ExitPolicy, Guidance, NoiseFn, StepSchedule, randn_like_from
from utils.distributed import activation_checkpointed, multi_rank
from utils.errors import ConfigError


class Rollout(NamedTuple):
    """Result of a rollout. The timesteps are None when the blocks stop at different steps (Rolling Forcing)."""

    latents: torch.Tensor                # [B, F, C, H, W]; grad-carrying where the exit forward kept gradients
    denoised_timestep_from: int | None   # raw (pre-shift) timestep the non-first blocks' exit step started from
    denoised_timestep_to: int | None     # raw timestep of the step after it (0 after the last step)
    first_trained_frame: int = 0         # frames before it take no part in the DMD loss (Rolling Forcing's clip)


def broadcast_ints(values: list[int], src: int = 0) -> list[int]:
    """``values`` of rank ``src`` on every rank (a host sync the rollout needs anyway)."""
    if not multi_rank():
        return list(values)
    backend = str(dist.get_backend())
    # A CPU tensor needs a gloo backend; a pure NCCL group only moves CUDA tensors.
    device = torch.device("cpu") if "gloo" in backend else torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=src)
    return [int(v) for v in tensor.tolist()]


def draw_exit_steps(schedule: StepSchedule, num_blocks: int, *, same_step_across_blocks: bool = True,
                    last_step_only: bool = False, generator: torch.Generator | None = None,
                    ) -> tuple[int | list[int], int | None]:
    """``(exit_step, first_block_exit_step)``, uniform draws identical on every rank: one index into
    ``schedule.timesteps`` shared by the blocks or one per block, and block 0's index into ``schedule.first_block``
    (None without one). ``last_step_only``: the last steps."""
    num_steps = len(schedule.timesteps)
    num_first = len(schedule.first_block) if schedule.first_block is not None else None
    if last_step_only:
        return num_steps - 1, (num_first - 1 if num_first is not None else None)
    first = [int(torch.randint(num_first, (1,), generator=generator))] if num_first is not None else []
    count = 1 if same_step_across_blocks else num_blocks
    rest = torch.randint(num_steps, (count,), generator=generator).tolist()
    drawn = broadcast_ints(first + rest)
    first_exit = drawn[0] if num_first is not None else None
    rest = drawn[len(first):]
    if same_step_across_blocks:
        return rest[0], first_exit
    if first_exit is not None:
        rest[0] = first_exit   # block 0 follows its own list; keep the list indexable by block
    return rest, first_exit


def denoised_timestep_range(scheduler: FlowMatchScheduler, timesteps: Sequence[float], exit_step: int,
                            ) -> tuple[int, int]:
    """``(T - index(τ_e), T - index(τ_{e+1}))`` (0 after the last step; ``index``: nearest training-grid entry), the
    raw timesteps of exit step ``e`` (training.md §6.3): (750, 500) for [1000, 937.5, 833.3, 625] and e = 1."""
    n = scheduler.num_train_timesteps
    index = scheduler.index_for(torch.tensor([float(t) for t in timesteps])).tolist()
    t_from = n - int(index[exit_step])
    t_to = 0 if exit_step >= len(timesteps) - 1 else n - int(index[exit_step + 1])
    return t_from, t_to


def _rollout_loop(generator: WanModel, scheduler: FlowMatchScheduler, schedule: StepSchedule,
                  context: torch.Tensor, num_frames: int, latent_shape: Sequence[int], context_noise: float,
                  noise_fn: NoiseFn | None, noise: torch.Tensor | None, dtype: torch.dtype | None,
                  rolling: tuple[int, int] | None) -> tuple[BlockLoop, torch.Tensor]:
    """The loop of one rollout and its noise. The cache holds the whole video or the generator's window; with
    Rolling Forcing the whole rollout, which its views read in part, so checkpointing can recompute each one."""
    noise_fn = noise_fn or randn_like_from(None)
    param = next(generator.parameters())
    dtype = dtype or param.dtype
    channels, height, width = (int(s) for s in latent_shape)
    batch = context.shape[0]
    if noise is None:
        noise = noise_fn(torch.empty(batch, num_frames, channels, height, width, device=param.device, dtype=dtype))
    window = generator.local_attn_size
    capacity = num_frames if window == -1 or rolling is not None else min(window, num_frames)
    sink = min(generator.sink_size if rolling is None else rolling[1], capacity - 1)
    cache = KVCache.for_model(generator, batch, height, width, capacity_frames=capacity, sink_frames=sink,
                              dtype=dtype, device=noise.device)
    if torch.is_grad_enabled() and activation_checkpointed(generator) and capacity < num_frames:
        # Checkpointed blocks re-read earlier frames' K/V from the cache in backward; a ring that wrapped has
        # overwritten them by then, which would give silently wrong gradients.
        raise ConfigError(f"a rollout of {num_frames} frames wraps the {capacity}-frame attention window "
                          f"(local_attn_size), which gradient checkpointing cannot recompute: set "
                          f"gradient_checkpointing: false, or local_attn_size: -1 or >= {num_frames}")
    views = CacheViews() if rolling is None else CacheViews.rolling(rolling[0])
    return BlockLoop(generator, scheduler, schedule, Guidance(context), cache, context_noise=float(context_noise),
                     noise_fn=noise_fn, views=views), noise


def self_forcing_rollout(generator: WanModel, scheduler: FlowMatchScheduler, schedule: StepSchedule,
                         context: torch.Tensor, num_frames: int, *, latent_shape: Sequence[int],
                         exit_step: int | Sequence[int] | None = None, first_block_exit_step: int | None = None,
                         grad_from_frame: int = 0, context_noise: float = 0.0, noise_fn: NoiseFn | None = None,
                         noise: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                         rolling: tuple[int, int] | None = None, phase: int | None = None) -> Rollout:
    """Generate ``num_frames`` latent frames (``latent_shape`` = (C, H, W)) block by block, each stopping at its exit
    step (:func:`draw_exit_steps`; None: the last). Gradients (when enabled) reach the generator only through the exit
    forwards of blocks starting at or after ``grad_from_frame``. ``noise [B, F, C, H, W]``: else drawn by
    ``noise_fn``; ``dtype``: of noise and cache (default the parameters'); ``rolling``: Rolling Forcing's
    ``(span, sink)`` views and cache. With ``rolling`` and a ``phase``, Rolling Forcing's windows instead of exit
    steps: windows ``k`` with ``k % steps == phase`` keep gradients when they end after ``grad_from_frame``, covering
    every block once (the rolling analogue of a random exit step)."""
    loop, noise = _rollout_loop(generator, scheduler, schedule, context, num_frames, latent_shape, context_noise,
                                noise_fn, noise, dtype, rolling)
    # Exit forwards keep gradients only when the caller asked for them: under no_grad (the critic's samples) every
    # forward runs in inference mode.
    grad = torch.is_grad_enabled()
    if phase is not None:
        steps, blocks = len(schedule.timesteps), len(generator.layout.block_sizes(num_frames))
        results = loop.rolling(lambda start, n: noise[:, start:start + n], num_blocks=blocks,
                               grad=lambda w, end: grad and w.index % steps == phase and end > grad_from_frame)
        parts = [result.x0 for result in results if result.window.index % steps == phase]
        return Rollout(torch.cat(parts, dim=1), None, None)
    exits = exit_step if exit_step is None or isinstance(exit_step, int) else tuple(int(e) for e in exit_step)
    policy = ExitPolicy(exits, first_block_exit_step, grad_on_exit=grad, grad_from_frame=grad_from_frame)
    # The last block's context pass would be read by nobody: skip it.
    blocks = [x0 for _, x0 in loop.run(noise, policy=policy, commit_last=False)]
    # Bookkeeping refers to the non-first blocks (block 0 only when it is the whole video).
    ref = 1 if len(blocks) > 1 else 0
    steps = schedule.for_block(ref)
    exit_ref = policy.exit_for(ref, len(steps))
    return Rollout(torch.cat(blocks, dim=1), *denoised_timestep_range(scheduler, steps, exit_ref))
