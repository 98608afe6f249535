"""Stage 3: distribution matching distillation with the self-forcing rollout (training.md §6; docs/stage3.md).

Generator loss: ``½·mean((x − sg[x − G])²)`` in float64 with ``G = (x̂0_fake − x̂0_real) / mean|x − x̂0_real|`` per
sample, so its gradient in ``x`` is ``G / numel``."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.guidance import cond_uncond_context, guide
from model.scheduler import FlowMatchScheduler
from pipeline import components
from pipeline.causal import StepSchedule
from pipeline.rollout import Rollout, broadcast_ints, draw_exit_steps, self_forcing_rollout
from trainer.batches import IndexBatches
from trainer.objective import Networks, Objective, Phase
from utils.config import Config
from utils.datasets import ResumableSampler, TextDataset
from utils.errors import ConfigError


class DMDObjective(Objective):
    """DMD objective (``trainer: score_distillation``). Without ``text_encoder``, batches carry ``prompt_embeds``
    ``[B, L, text_dim]`` and :attr:`negative_embeds` is set by the caller (speed benchmarks)."""

    fresh_batch_per_phase = True  # generator and critic steps draw their own prompts (reference behaviour)

    def __init__(self, cfg: Config, text_encoder: bool = True):
        if cfg.denoising_step_list is None:
            raise ConfigError("score_distillation needs a few-step denoising_step_list")
        self.cfg = cfg
        self.use_text_encoder = text_encoder
        self.scheduler: FlowMatchScheduler = components.build_scheduler(cfg)
        self.schedule = StepSchedule.from_config(self.scheduler, cfg.denoising_step_list,
                                                 cfg.denoising_step_list_first_chunk, warp=cfg.warp_denoising_step)
        self.latent_shape = tuple(cfg.image_or_video_shape[2:])   # (C, H, W)
        self.device = torch.device("cpu")
        self.compute_dtype = torch.float32
        self.negative_embeds: torch.Tensor | None = None   # [1, L, D], encoded once
        self.last_exit_step = -1   # exit step of the latest rollout (a metric; Rolling Forcing: its phase)
        self.vae = None            # Rolling Forcing, rollouts longer than the clip: re-encodes its first frame

    def build_networks(self, device: torch.device) -> Networks:
        cfg = self.cfg
        self.device = torch.device(device)
        # bf16 compute on GPUs with mixed precision (FSDP's policy casts the fp32 masters); CPU runs stay fp32.
        mixed = cfg.mixed_precision and self.device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if mixed else torch.float32
        generator = components.build_generator(cfg, cfg.generator_ckpt, device=self.device, dtype=torch.float32)
        critic = components.build_bidirectional(cfg, cfg.fake_name, device=self.device, dtype=torch.float32)
        for net in (generator, critic):   # gradient checkpointing is the loop's (applied from outside)
            net.requires_grad_(True).train()
        real_device = torch.device("cpu") if cfg.real_score_cpu_offload else self.device
        real = components.build_bidirectional(cfg, cfg.real_name, device=real_device, dtype=self.compute_dtype)
        frozen: dict[str, nn.Module] = {"real_score": real.requires_grad_(False).eval()}
        if cfg.rolling_forcing and cfg.num_training_frames > cfg.image_or_video_shape[1]:
            # per rank and unsharded (a few hundred MB): it decodes and encodes one frame per rollout
            self.vae = components.build_vae(cfg, device=self.device, dtype=self.compute_dtype).requires_grad_(False)
        if self.use_text_encoder:
            te_device = torch.device("cpu") if cfg.text_encoder_cpu_offload else self.device
            frozen["text_encoder"] = components.build_text_encoder(
                cfg, device=te_device, dtype=torch.bfloat16 if mixed else torch.float32, output_device=self.device)
        return Networks(trainable={"generator": generator, "critic": critic}, frozen=frozen)

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [Phase.generator(cfg),
                Phase("critic", cfg.lr_critic, (cfg.beta1_critic, cfg.beta2_critic), cfg.max_grad_norm_critic)]

    def phases_at(self, step: int) -> list[str]:
        return ["generator", "critic"] if step % self.cfg.dfake_gen_update_ratio == 0 else ["critic"]

    def data(self, rank: int, world_size: int, seed: int) -> Iterator[Any]:
        dataset = TextDataset(self.cfg.data_path)
        # No DataLoader workers read ahead here: the sampler's own state is the data position.
        self.data_position = ResumableSampler(dataset, seed=seed, num_replicas=world_size, rank=rank)
        indices = IndexBatches(self.data_position, self.cfg.batch_size)
        return ({"prompts": [dataset[i]["prompts"] for i in batch]} for batch in indices)

    def loss(self, phase: str, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        context = self.encode(batch)
        if phase == "generator":
            rollout = self.rollout(context, grad=True)
            loss, metrics = self.distribution_matching_loss(rollout.latents, context, rollout=rollout,
                                                            first_frame=rollout.first_trained_frame)
            return loss, {"generator_loss": loss.detach(), **metrics}
        if phase == "critic":
            with torch.no_grad():
                rollout = self.rollout(context, grad=False)
            loss, metrics = self.critic_loss(rollout.latents, context, rollout=rollout)
            return loss, {"critic_loss": loss.detach(), **metrics}
        raise ValueError(f"unknown phase {phase!r}; DMD has 'generator' and 'critic'")

    def rollout(self, context: torch.Tensor, grad: bool) -> Rollout:
        """Self-forcing rollout of ``num_training_frames`` frames; exit steps shared by all ranks."""
        cfg = self.cfg
        if cfg.rolling_forcing:
            return self.rolling_forcing_rollout(context, grad)
        num_frames = cfg.num_training_frames
        exit_step, first_exit = self._draw_exit_steps(
            len(self.networks.trainable["generator"].layout.block_sizes(num_frames)))
        return self._rollout(context, grad, num_frames, exit_step, first_block_exit_step=first_exit)

    def _draw_exit_steps(self, num_blocks: int) -> tuple[int | list[int], int | None]:
        return draw_exit_steps(self.schedule, num_blocks, same_step_across_blocks=self.cfg.same_step_across_blocks,
                               last_step_only=self.cfg.last_step_only)

    def _rollout(self, context: torch.Tensor, grad: bool, num_frames: int, exit_step: int | list[int],
                 **options) -> Rollout:
        """:func:`self_forcing_rollout` of the generator (``options``: its keywords) under ``grad``."""
        with torch.set_grad_enabled(grad):
            result = self_forcing_rollout(
                self.networks.trainable["generator"], self.scheduler, self.schedule, context, num_frames,
                latent_shape=self.latent_shape, exit_step=exit_step, context_noise=self.cfg.context_noise,
                dtype=self.compute_dtype, **options)
        self.last_exit_step = exit_step if isinstance(exit_step, int) else exit_step[-1]
        return result

    def rolling_forcing_rollout(self, context: torch.Tensor, grad: bool,
                                draws: tuple[int, int, int] | None = None) -> Rollout:
        """Rolling Forcing's training rollout, cut to its last clip. ``draws`` = (blocks, 1 for rolling windows or 0
        for the self-forcing rollout, phase), drawn on rank 0 and shared when not given."""
        cfg = self.cfg
        n, clip, steps = cfg.num_frame_per_block, cfg.image_or_video_shape[1], len(self.schedule.timesteps)
        if draws is None:
            draws = broadcast_ints([int(torch.randint(clip // n, cfg.num_training_frames // n + 1, ())),
                                    int(torch.randint(2, ())), int(torch.randint(steps, ()))])
        blocks, windows, phase = draws
        num_frames = blocks * n
        result = self._rollout(context, grad, num_frames, phase if windows else self._draw_exit_steps(blocks)[0],
                               phase=phase if windows else None, grad_from_frame=num_frames - clip,
                               rolling=(cfg.rolling_span, cfg.rolling_sink))
        # a longer rollout's clip starts with a re-encoded frame: its block is left out of the DMD loss
        return result._replace(latents=self._last_clip(result.latents, clip),
                               first_trained_frame=n if num_frames > clip else 0)

    def _last_clip(self, latents: torch.Tensor, clip: int) -> torch.Tensor:
        """The last ``clip`` frames, the first of them the re-encoded last pixel frame of the frames before it."""
        if latents.shape[1] == clip:
            return latents
        with torch.no_grad():
            pixels = self.vae.decode(latents[:, :latents.shape[1] - clip + 1].detach().to(self.compute_dtype))
            first = self.vae.encode(pixels[:, -1:].transpose(1, 2).to(self.compute_dtype))   # [B, 1, C, h, w]
        return torch.cat([first.to(latents.dtype), latents[:, latents.shape[1] - clip + 1:]], dim=1)

    def distribution_matching_loss(self, x: torch.Tensor, context: torch.Tensor, rollout: Rollout | None = None,
                                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                                   first_frame: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """float64 DMD loss of generator samples ``x [B, F, C, H, W]`` (with grad) and metrics; frames before
        ``first_frame`` take no part. ``t [B, F]`` and ``noise`` are drawn when None."""
        cfg = self.cfg
        critic, real = self.networks.trainable["critic"], self.networks.frozen["real_score"]
        with torch.no_grad():
            t = self.score_timesteps(x, rollout) if t is None else t
            noise = torch.randn_like(x) if noise is None else noise
            x_t = self.scheduler.add_noise(x.detach(), noise, t)
            negative = self.negative(context)
            x0_fake = self.score_x0(critic, x_t, t, context, negative, cfg.fake_guidance_scale)
            with self._on_device(real):
                x0_real = self.score_x0(real, x_t, t, context, negative, cfg.real_guidance_scale)
            x_clean = x.detach().float()
            # Per-sample normaliser: mean |x - x̂0_real| over (F, C, H, W).
            normaliser = (x_clean - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            grad = torch.nan_to_num((x0_fake - x0_real) / normaliser)
        x64 = x[:, first_frame:].double()
        target = (x64 - grad[:, first_frame:].double()).detach()
        if cfg.first_frame_loss_weight == 1 or first_frame:   # unweighted, or video frame 0 not in the loss
            loss = 0.5 * F.mse_loss(x64, target)
        else:   # latent frame 0 weighted (frame weights of mean 1)
            w = self.frame_weights(x64.shape[1], x.device).double().view(1, -1, *[1] * (x.ndim - 2))
            loss = 0.5 * ((x64 - target).square() * w).mean()
        return loss, {"dmdtrain_gradient_norm": grad.abs().mean(), **self._step_metrics(t)}

    def critic_loss(self, x_gen: torch.Tensor, context: torch.Tensor, rollout: Rollout | None = None,
                    t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Denoising loss of the critic on generator samples ``x_gen [B, F, C, H, W]`` (no grad); float64 scalar."""
        critic = self.networks.trainable["critic"]
        with torch.no_grad():
            t = self.score_timesteps(x_gen, rollout) if t is None else t
            noise = torch.randn_like(x_gen) if noise is None else noise
            x_t = self.scheduler.add_noise(x_gen, noise, t)
        flow = critic(x_t.to(self.compute_dtype), t, context)
        # x0 and the flow recovered from it in float64 (the reference's round trip, without its bf16 rounding of
        # x0, which 1/σ would amplify at small σ).
        x0 = self.scheduler.flow_to_x0(flow.double(), x_t.double(), t)
        if self.cfg.denoising_loss_type == "flow":
            pred = self.scheduler.x0_to_flow(x0, x_t.double(), t)
            loss = F.mse_loss(pred, self.scheduler.training_target(x_gen.double(), noise.double()))
        else:
            loss = F.mse_loss(x0, x_gen.double())
        return loss, self._step_metrics(t)

    def score_timesteps(self, x: torch.Tensor, rollout: Rollout | None = None) -> torch.Tensor:
        """DMD/critic timesteps ``[B, F]``, one per sample: shifted uniform in [low, high), clamped to [2%, 98%]·T;
        ``low``/``high`` are the rollout's ``denoised_timestep_to``/``_from`` with ``ts_schedule``/``ts_schedule_max``,
        else ``min_score_timestep``/T."""
        cfg = self.cfg
        low, high = cfg.min_score_timestep, cfg.num_train_timestep
        if rollout is not None and cfg.ts_schedule and rollout.denoised_timestep_to is not None:
            low = rollout.denoised_timestep_to
        if rollout is not None and cfg.ts_schedule_max and rollout.denoised_timestep_from is not None:
            high = rollout.denoised_timestep_from
        return self.scheduler.sample_dmd_timesteps(x.shape[0], x.shape[1], low=low, high=max(high, low + 1),
                                                   shift=cfg.timestep_shift, device=x.device)

    def score_x0(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 negative: torch.Tensor | None, scale: float) -> torch.Tensor:
        """float32 x̂0 of a score network; ``scale > 0`` guides as ``cond + scale·(cond − uncond)`` (the configs'
        convention: :func:`~model.guidance.guide` with ``1 + scale``), both halves as one ``2B`` batch."""
        x_in = x_t.to(self.compute_dtype)
        if scale == 0 or negative is None:
            return self.scheduler.flow_to_x0(model(x_in, t, context).float(), x_t.float(), t)
        flow = model(torch.cat([x_in, x_in]), torch.cat([t, t]), cond_uncond_context(context, negative)).float()
        x0 = self.scheduler.flow_to_x0(flow, torch.cat([x_t, x_t]).float(), torch.cat([t, t]))
        return guide(*x0.chunk(2), 1.0 + scale)

    def encode(self, batch: dict) -> torch.Tensor:
        """Prompt embeddings ``[B, L, D]`` of a batch (computed once per batch, without gradients)."""
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(self.device, self.compute_dtype)
        encoder = self.networks.frozen["text_encoder"]
        with torch.no_grad(), self._on_device(encoder):
            return encoder.encode(list(batch["prompts"])).to(self.device, self.compute_dtype)

    def negative(self, context: torch.Tensor) -> torch.Tensor | None:
        """The negative prompt's embedding ``[1, L, D]``, encoded on first use and cached; None if no guidance."""
        if self.cfg.real_guidance_scale == 0 and self.cfg.fake_guidance_scale == 0:
            return None
        if self.negative_embeds is None:
            self.negative_embeds = self.encode({"prompts": [self.cfg.negative_prompt]})
        return self.negative_embeds.to(context.device, context.dtype)

    @contextlib.contextmanager
    def _on_device(self, model: nn.Module):
        """Use a CPU-resident frozen network on the compute device (when no FSDP offload manages it)."""
        from torch.distributed.fsdp import FSDPModule

        inner = getattr(model, "encoder", model)   # the TextEncoder wrapper holds its weights in .encoder
        param = next(inner.parameters())
        if isinstance(model, FSDPModule) or isinstance(inner, FSDPModule) or param.device == self.device:
            yield model
            return
        inner.to(self.device)
        try:
            yield model
        finally:
            inner.to(param.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _step_metrics(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score_timestep": t.float().mean(), "exit_step": torch.tensor(float(self.last_exit_step))}
