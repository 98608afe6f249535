"""The self-forcing rollout of Stage 3 (training.md §6.3; docs/stage3.md), run by :class:`~pipeline.causal.BlockLoop`.

The generator writes a video as at inference, each block stopping at a drawn *exit step* whose forward alone keeps
gradients; a no-grad context pass then caches the block. Gradients thus never cross denoising steps or blocks (the
cache holds values, not graphs). What differs from inference is an :class:`ExitPolicy`; exit steps are drawn on rank 0
and shared (:func:`draw_exit_steps`) because FSDP ranks must run the same forwards in lock-step.

:func:`rolling_rollout` is Rolling Forcing's (published ``long_video/pipeline/rolling_forcing_training.py``): the
windows of :meth:`BlockLoop.rolling`, where windows ``phase, phase + S, ...`` keep gradients; they cover every block
once, so each block is its prediction in its phase window, the rolling analogue of a random exit step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from model.wan import WanModel
from pipeline.causal import BlockLoop, CacheViews, ExitPolicy, Guidance, NoiseFn, StepSchedule, randn_like_from
from utils.distributed import activation_checkpointed
from utils.errors import ConfigError


class Rollout(NamedTuple):
    """Result of :func:`self_forcing_rollout`."""

    latents: torch.Tensor            # [B, F, C, H, W]; grad-carrying where the exit forward kept gradients
    denoised_timestep_from: int | None   # raw (pre-shift) timestep the non-first blocks' exit step started from
    denoised_timestep_to: int | None     # raw timestep of the step after it (0 after the last step); both None when
                                         # the blocks stop at different steps (Rolling Forcing windows)
    first_trained_frame: int = 0         # frames before it take no part in the DMD loss (Rolling Forcing's clip)


@dataclass
class PerBlockExitPolicy(ExitPolicy):
    """One exit step per block (``same_step_across_blocks: false``)."""

    per_block: tuple[int, ...] = ()

    def exit_for(self, block_index: int, num_steps: int) -> int:
        if block_index < len(self.per_block):
            return min(self.per_block[block_index], num_steps - 1)
        return super().exit_for(block_index, num_steps)


def broadcast_ints(values: list[int], src: int = 0) -> list[int]:
    """``values`` of rank ``src`` on every rank (identity without a multi-rank group). A host sync, which the rollout
    needs anyway: the exit steps decide how many forwards run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
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
    """``(exit_step, first_block_exit_step)`` of one rollout, uniform draws identical on every rank: one index into
    ``schedule.timesteps`` shared by the blocks (``same_step_across_blocks``) or one per block, and block 0's own
    index into ``schedule.first_block`` when there is one (else None). ``last_step_only``: the last steps."""
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


def rollout_cache(generator: WanModel, batch: int, num_frames: int, height: int, width: int,
                  dtype: torch.dtype, device: torch.device, rolling_sink: int | None = None) -> KVCache:
    """A cache of the whole video, or of the generator's attention window and sink; with Rolling Forcing
    (``rolling_sink``) of the whole rollout, which its views read in part, so checkpointing can recompute each one."""
    window = generator.local_attn_size
    capacity = num_frames if window == -1 or rolling_sink is not None else min(window, num_frames)
    sink = min(generator.sink_size if rolling_sink is None else rolling_sink, capacity - 1)
    return KVCache.for_model(generator, batch, height, width, capacity_frames=capacity, sink_frames=sink,
                             dtype=dtype, device=device)


def _check_recomputable(generator: WanModel, cache: KVCache, num_frames: int) -> None:
    if torch.is_grad_enabled() and activation_checkpointed(generator) and cache.capacity < num_frames:
        # Checkpointed blocks re-read earlier frames' K/V from the cache in backward; a ring that wrapped has
        # overwritten them by then, which would give silently wrong gradients.
        raise ConfigError(f"a rollout of {num_frames} frames wraps the {cache.capacity}-frame attention window "
                          f"(local_attn_size), which gradient checkpointing cannot recompute: set "
                          f"gradient_checkpointing: false, or local_attn_size: -1 or >= {num_frames}")


def self_forcing_rollout(generator: WanModel, scheduler: FlowMatchScheduler, schedule: StepSchedule,
                         context: torch.Tensor, num_frames: int, *, latent_shape: Sequence[int],
                         exit_step: int | Sequence[int] | None = None, first_block_exit_step: int | None = None,
                         grad_from_frame: int = 0, context_noise: float = 0.0, noise_fn: NoiseFn | None = None,
                         cache: KVCache | None = None, noise: torch.Tensor | None = None,
                         dtype: torch.dtype | None = None, views: CacheViews | None = None) -> Rollout:
    """Generate ``num_frames`` latent frames block by block, each stopping at its exit step.

    Args:
        latent_shape: ``(C, H, W)`` of one latent frame; ``context``: prompt embeddings ``[B, L, text_dim]``.
        exit_step: shared exit index of the blocks, or one per block; ``None`` = the last step.
        first_block_exit_step: block 0's index into ``schedule.first_block`` (``None`` = ``exit_step``).
        grad_from_frame: blocks starting before this frame exit without gradients.
        context_noise: timestep of the context pass (0 = exactly clean).
        cache: a cache to reuse (reset here), else one for ``num_frames`` frames; ``noise``: the initial noise
            ``[B, F, C, H, W]``, else drawn by ``noise_fn``; ``dtype``: of noise and cache (default the cache's or the
            parameters'); ``views``: what the forwards attend to (Rolling Forcing's, for its self-forcing half).
    Returns:
        :class:`Rollout`; gradients (when enabled) reach the generator only through the exit forwards of blocks at or
        after ``grad_from_frame``.
    """
    noise_fn = noise_fn or randn_like_from(None)
    param = next(generator.parameters())
    dtype = dtype or (cache.k.dtype if cache is not None else param.dtype)
    channels, height, width = (int(s) for s in latent_shape)
    batch = context.shape[0]
    if noise is None:
        noise = noise_fn(torch.empty(batch, num_frames, channels, height, width, device=param.device, dtype=dtype))
    if cache is None:
        cache = rollout_cache(generator, batch, num_frames, height, width, dtype, noise.device)
    else:
        cache.reset()
    _check_recomputable(generator, cache, num_frames)
    # Exit forwards keep gradients (the model's rollout mode) only when the caller asked for them: a rollout under
    # no_grad (the critic's samples) runs every forward in inference mode.
    grad = torch.is_grad_enabled()
    if exit_step is None or isinstance(exit_step, int):
        policy: ExitPolicy = ExitPolicy(exit_step, first_block_exit_step, grad_on_exit=grad,
                                        grad_from_frame=grad_from_frame)
    else:
        policy = PerBlockExitPolicy(None, first_block_exit_step, grad_on_exit=grad, grad_from_frame=grad_from_frame,
                                    per_block=tuple(int(e) for e in exit_step))
    loop = BlockLoop(generator, scheduler, schedule, Guidance(context), cache, context_noise=float(context_noise),
                     noise_fn=noise_fn, views=views or CacheViews())
    # The last block's context pass would be read by nobody: skip it.
    blocks = [x0 for _, x0 in loop.run(noise, policy=policy, commit_last=False)]
    latents = torch.cat(blocks, dim=1)
    # Bookkeeping refers to the non-first blocks (block 0 only when it is the whole video).
    ref = 1 if len(blocks) > 1 else 0
    steps = schedule.for_block(ref)
    t_from, t_to = denoised_timestep_range(scheduler, steps, policy.exit_for(ref, len(steps)))
    return Rollout(latents, t_from, t_to)


def rolling_rollout(generator: WanModel, scheduler: FlowMatchScheduler, schedule: StepSchedule,
                    context: torch.Tensor, num_frames: int, *, latent_shape: Sequence[int], span: int, sink: int,
                    phase: int, grad_from_frame: int = 0, context_noise: float = 0.0,
                    noise_fn: NoiseFn | None = None, noise: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> Rollout:
    """Rolling Forcing's rollout (module docstring) of ``num_frames`` frames, each forward attending to ``span``
    frames, ``sink`` of them sink frames. Windows ``k`` with ``k % steps == phase`` keep gradients when they end after
    ``grad_from_frame``; the result has no single exit step, so no timestep range. Otherwise as
    :func:`self_forcing_rollout`."""
    noise_fn = noise_fn or randn_like_from(None)
    param = next(generator.parameters())
    dtype = dtype or param.dtype
    channels, height, width = (int(s) for s in latent_shape)
    if noise is None:
        noise = noise_fn(torch.empty(context.shape[0], num_frames, channels, height, width, device=param.device,
                                     dtype=dtype))
    cache = rollout_cache(generator, context.shape[0], num_frames, height, width, dtype, noise.device, sink)
    _check_recomputable(generator, cache, num_frames)
    loop = BlockLoop(generator, scheduler, schedule, Guidance(context), cache, context_noise=float(context_noise),
                     noise_fn=noise_fn, views=CacheViews.rolling(span))
    steps, grad = len(schedule.timesteps), torch.is_grad_enabled()
    blocks = len(generator.layout.block_sizes(num_frames))
    parts: list[torch.Tensor] = []
    for result in loop.rolling(lambda start, n: noise[:, start:start + n], num_blocks=blocks,
                               grad=lambda w, end: grad and w.index % steps == phase and end > grad_from_frame):
        if result.window.index % steps == phase:
            parts.append(result.x0)
    return Rollout(torch.cat(parts, dim=1), None, None)
