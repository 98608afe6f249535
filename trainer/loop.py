"""The one training loop of every stage (docs/training_loop.md gives its order); an
:class:`~trainer.objective.Objective` names the networks, the optimizer phases and how a micro-batch becomes a loss.
The objective sees the 0-based ``step``; logs and checkpoint names count steps done."""

from __future__ import annotations

import gc
import logging
import random
import time
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.objective import Networks, Objective, Phase
from trainer.samples import SampleWriter
from utils import checkpoint, distributed
from utils.config import Config, config_to_yaml, grad_accum_steps
from utils.ema import ShardLocalEMA
from utils.errors import CheckpointError, ConfigError, OutputError, UserError, free_space, one_line
from utils.metrics import MetricAccumulator, MetricsLogger, build_metrics_logger

logger = logging.getLogger(__name__)


class Trainer:
    """Runs an objective: ``Trainer(cfg, objective).train()``; tests drive :meth:`setup` / :meth:`train_step`.
    ``keep_checkpoints``: resume checkpoints kept (release exports are all kept, as the reference did)."""

    def __init__(self, cfg: Config, objective: Objective, keep_checkpoints: int = 3):
        if not cfg.logdir and not cfg.no_save:
            raise ConfigError("logdir is empty: pass --logdir (or --no_save to write nothing)")
        self.cfg = cfg
        self.objective = objective
        self.keep_checkpoints = keep_checkpoints
        self.phases: dict[str, Phase] = {p.name: p for p in objective.phases()}
        self.emas: dict[str, ShardLocalEMA] = {}
        self.world: Optional[distributed.World] = None
        self.networks: Optional[Networks] = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.data: Optional[Iterator[Any]] = None
        self.metrics: Optional[MetricsLogger] = None
        self._acc: Optional[MetricAccumulator] = None
        self._accum = 1
        self._last_log = (0.0, 0)  # (time, step) of the last metrics line
        self._owns_process_group = False
        self._lock: Optional[checkpoint.LogdirLock] = None
        self._samples: Optional[SampleWriter] = None

    def train(self) -> int:
        """Train until ``cfg.max_steps`` (forever when 0); returns the number of steps completed."""
        bar, finished = None, False
        try:
            step = self.setup()
            cfg, w = self.cfg, self.world
            self.metrics = build_metrics_logger(cfg, w.is_main, start_step=step)
            self._last_log = (time.perf_counter(), step)
            if w.device.type == "cuda":   # peak_memory_gib covers the steps, not building and sharding the networks
                torch.cuda.reset_peak_memory_stats(w.device)
            bar = tqdm(total=cfg.max_steps or None, initial=step, disable=not w.is_main, dynamic_ncols=True,
                       unit="step")
            with logging_redirect_tqdm():
                while cfg.max_steps == 0 or step < cfg.max_steps:
                    self.train_step(step)
                    step += 1
                    bar.update(1)
                    if step % cfg.log_every == 0:
                        self._log(step, bar)
                    if step % cfg.log_iters == 0 and not cfg.no_save:
                        self.save(step)
                    if cfg.gc_interval and step % cfg.gc_interval == 0:
                        gc.collect()
                if self._acc.pending:
                    self._log(step, bar)
                if not cfg.no_save:
                    self.save(step)
            finished = True
            return step
        finally:
            self._close(bar, finished)

    def setup(self) -> int:
        """Everything before the first step; returns the step to start from (0, or the resumed checkpoint's)."""
        if self.cfg.text_encoder_int8:   # FSDP would shard and cast int8 tensors as if they were weights
            raise ConfigError("text_encoder_int8 is an inference setting (inference.py, demo.py); remove it from "
                              "the training config")
        self._owns_process_group = not dist.is_initialized()
        self.world = w = distributed.init_distributed()
        self._lock_logdir()
        if w.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._seed(self.cfg.seed)  # same on every rank, so randomly initialised weights agree before sharding
        self.networks = self._build_networks()
        self.optimizers = {name: self._build_optimizer(phase) for name, phase in self.phases.items()}
        self.data = self.objective.data(w.rank, w.world_size, self.cfg.seed)
        self._seed(self.cfg.seed + w.rank)  # per-rank noise from here on (training.md §8.6)
        self._accum = grad_accum_steps(self.cfg, w.world_size)
        self._acc = MetricAccumulator(w.device)
        self._samples = None if self.cfg.no_visualize else SampleWriter(self.cfg, w.is_main)
        step = self._resume()
        self._start_emas_from_start()
        for name, ema in self.emas.items():
            self.objective.ema_updated(name, ema, step)
        return step

    def train_step(self, step: int) -> None:
        """One optimizer step of every phase due at ``step`` (0-based) on ``accum`` micro-batches."""
        batches = None
        for name in self.objective.phases_at(step):
            if batches is None or self.objective.fresh_batch_per_phase:
                batches = [next(self.data) for _ in range(self._accum)]
            self._train_phase(self.phases[name], batches, step)

    def _lock_logdir(self) -> None:
        """Rank 0 locks the logdir and removes what killed runs left there; every rank stops if it cannot."""
        error = None
        if self.cfg.logdir and self.world.is_main:
            try:
                self._lock = checkpoint.LogdirLock(self.cfg.logdir)
                checkpoint.remove_stale_files(self.cfg.logdir)   # safe now: no other run writes there
            except UserError as err:
                error = err
        if not distributed.all_ok(error is None):
            raise error or CheckpointError(f"rank 0 could not lock {self.cfg.logdir}")

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds every CUDA device

    def _build_networks(self) -> Networks:
        """The objective's networks on this rank's device, then checkpointing, compile and FSDP2."""
        cfg, w = self.cfg, self.world
        nets = self.objective.build_networks(w.device)
        if missing := sorted(set(self.phases) - set(nets.trainable)):
            raise ValueError(f"objective has phases {missing} without a trainable network of that name")
        mesh = distributed.build_mesh(cfg.sharding_strategy, w)
        shard = distributed.fsdp_needed(mesh, cfg.mixed_precision)
        if not shard:
            logger.info("FSDP2 not applied: one rank, fp32 (mixed_precision: false): nothing to shard or cast")
        for model in nets.trainable.values():
            if cfg.gradient_checkpointing:  # wrapped from outside, not the model's own flag: see the function's doc
                distributed.apply_activation_checkpointing(model)
            if cfg.compile:
                for block in distributed.transformer_blocks(model):
                    block.compile()  # in place: parameter names stay canonical (no ``_orig_mod.``)
            if shard:
                distributed.apply_fsdp(model, cfg.sharding_strategy, cfg.mixed_precision, mesh)
            model.train()
        offload = {"text_encoder": cfg.text_encoder_cpu_offload, "real_score": cfg.real_score_cpu_offload}
        for name, model in nets.frozen.items():
            off = offload.get(name, False) and w.device.type == "cuda"
            if distributed.fsdp_needed(mesh, cfg.mixed_precision, off):
                distributed.shard_frozen(model, cfg.sharding_strategy, cfg.mixed_precision, mesh, cpu_offload=off)
            else:
                model.requires_grad_(False).eval()
        self.objective.attach(nets)
        return nets

    def _build_optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        params = [p for p in self.networks.trainable[phase.name].parameters() if p.requires_grad]
        # One multi-tensor kernel per step on GPU instead of a loop over parameters.
        impl = {"fused": True} if self.world.device.type == "cuda" else {}
        return torch.optim.AdamW(params, lr=phase.lr, betas=tuple(phase.betas), weight_decay=self.cfg.weight_decay,
                                 **impl)

    def _state(self) -> checkpoint.TrainState:
        return checkpoint.TrainState(models=dict(self.networks.trainable), optimizers=self.optimizers, emas=self.emas)

    def _resume(self) -> int:
        path = checkpoint.latest_checkpoint(self.cfg.logdir) if self.cfg.logdir else None
        if path is None:
            logger.info("no checkpoint under %s/checkpoints: starting at step 0", self.cfg.logdir or "(no logdir)")
            return 0
        # EMAs exist from ema_start_step on: recreate them before loading into them
        for name in checkpoint.read_meta(path)["emas"]:
            self.emas[name] = ShardLocalEMA(self.networks.trainable[name], self.cfg.ema_weight)
        step, data_state = checkpoint.load_checkpoint(path, self._state())
        for name, optimizer in self.optimizers.items():  # the config wins over the saved hyper-parameters
            phase = self.phases[name]
            for group in optimizer.param_groups:
                group.update(lr=phase.lr, betas=tuple(phase.betas))
        if data_state is not None:
            self.objective.load_data_state(data_state)
        logger.info("resumed from %s at step %d (networks, optimizers, EMA %s, RNG, data position)", path,
                    step, sorted(self.emas) or "none")
        if not self.cfg.no_save:   # a kill or a full disk between the checkpoint and its export left none
            self._export_release(step)
        return step

    def _start_emas_from_start(self) -> None:
        """Create the EMAs of ``ema_from_start`` phases that no checkpoint restored."""
        for phase in self.phases.values():
            if phase.ema and phase.ema_from_start and self.cfg.ema_weight > 0 and phase.name not in self.emas:
                self.emas[phase.name] = ShardLocalEMA(self.networks.trainable[phase.name], self.cfg.ema_weight)
                logger.info("EMA of %s kept from the start (decay %g)", phase.name, self.cfg.ema_weight)

    def _train_phase(self, phase: Phase, batches: list, step: int) -> None:
        """Accumulate gradients over ``batches``, clip, step AdamW, update the EMA."""
        model = self.networks.trainable[phase.name]
        optimizer = self.optimizers[phase.name]
        optimizer.zero_grad(set_to_none=True)
        n = len(batches)
        for i, batch in enumerate(batches):
            distributed.set_gradient_sync(model, i == n - 1)  # reduce gradients once, after the last micro-batch
            loss, metrics = self.objective.loss(phase.name, batch, step)
            (loss / n).backward()
            self._acc.add(f"{phase.name}_loss", loss, step + 1, must_be_finite=True)
            for key, value in metrics.items():
                self._acc.add(key, value, step + 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], phase.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # DTensor on sharded parameters
            grad_norm = grad_norm.full_tensor()
        self._acc.add(f"{phase.name}_grad_norm", grad_norm, step + 1)
        optimizer.step()
        if phase.ema and self.cfg.ema_weight > 0 and (step >= self.cfg.ema_start_step or phase.ema_from_start):
            ema = self.emas.get(phase.name)
            if ema is None:  # created from the current weights at ema_start_step, as the reference does
                ema = self.emas[phase.name] = ShardLocalEMA(model, self.cfg.ema_weight)
                logger.info("EMA of %s started at step %d (decay %g)", phase.name, step, self.cfg.ema_weight)
            else:
                ema.update()
            self.objective.ema_updated(phase.name, ema, step)

    def _log(self, step: int, bar: tqdm) -> None:
        """Reduce the accumulated metrics (the one host sync of a log step) and write them."""
        metrics = self._acc.reduce()
        now = time.perf_counter()
        (then, last_step) = self._last_log
        steps = max(step - last_step, 1)
        self._last_log = (now, step)
        samples = self.cfg.batch_size * self.world.world_size * self._accum * steps
        metrics["step_time"] = (now - then) / steps
        metrics["samples_per_s"] = samples / max(now - then, 1e-9)
        for name, optimizer in self.optimizers.items():
            metrics[f"{name}_lr"] = optimizer.param_groups[0]["lr"]
        metrics.update(self._peak_memory())
        self.metrics.log(metrics, step)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k.endswith("_loss")}, refresh=False)

    def _peak_memory(self) -> dict[str, float]:
        """``peak_memory_gib``: the most CUDA memory allocated on any rank since the last log."""
        device = self.world.device
        if device.type != "cuda":
            return {}
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], dtype=torch.float64, device=device)
        if self.world.world_size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_memory_gib": peak.item()}

    def save(self, step: int) -> None:
        """Resume checkpoint + release export of ``step`` (collective). Never saves a diverged model."""
        self._acc.check_finite()
        checkpoint.save_checkpoint(self.cfg.logdir, step, self._state(), self.objective.data_state(),
                        config_to_yaml(self.cfg), keep=self.keep_checkpoints)
        self._export_release(step)
        if self._samples is not None:   # sample videos of the saved weights (collective: every rank generates)
            self._samples(self.networks, step, self.metrics)

    def _close(self, bar: Optional[tqdm], finished: bool) -> None:
        if bar is not None:
            bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._owns_process_group:
            distributed.close_distributed(finished)

    def _export_release(self, step: int) -> None:
        """``checkpoint_model_<N>/model.pt``: ``generator`` (and after ``ema_start_step`` ``generator_ema``)."""
        if "generator" not in self.networks.trainable:
            return
        path = checkpoint.release_path(self.cfg.logdir, step)
        if path.is_file():
            return
        from model.loader import save_release_checkpoint  # lazy: the loop itself needs no model code

        generator = checkpoint.full_model_state_dict(self.networks.trainable["generator"])
        # An EMA kept from the start (CD's target) is exported, like any other, once ema_start_step has passed.
        with_ema = "generator" in self.emas and step > self.cfg.ema_start_step
        ema = self.emas["generator"].full_state_dict() if with_ema else None
        if self.world.is_main:
            try:
                save_release_checkpoint(path, generator, ema)
            except OSError as err:   # e.g. a full disk; the resume checkpoint exists, and a resume exports again
                raise OutputError(f"exporting {path} failed ({type(err).__name__}: {one_line(err)}){free_space(path)};"
                                  f" the resume checkpoint of step {step} is saved and a resumed run writes the "
                                  f"export") from None
