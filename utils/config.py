"""Typed configuration: the :class:`Config` schema holds every default with its one-line doc; YAMLs load strictly.

Load order (later wins): schema < ``default_config.yaml`` beside the file < ``base:`` chain < the YAML < overrides
(README "Configs" has the rules). ``python -m app.config`` prints a resolved config, or every default with its doc."""

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from utils.config_compat import adapt_layer, published_rolling_forcing
from utils.config_yaml import check_keys, describe_type_error, find_default_config, read_chain, read_override
from utils.errors import ConfigError
from utils.paths import in_repository

TRAINERS = ("diffusion", "ode", "consistency_distillation", "score_distillation")
SHARDING_STRATEGIES = ("full", "hybrid_full", "hybrid_zero2", "no_shard")
DENOISING_LOSS_TYPES = ("flow", "x0")
WANDB_MODES = ("disabled", "offline", "online")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn")
SAMPLE_SOLVERS = ("unipc", "euler")
LOSS_WEIGHTINGS = ("gaussian", "uniform")

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

# Strides of the Wan2.1 VAE that every model folder here uses (latent -> pixels); build_vae checks a loaded VAE.
VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8


def _f(default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with its one-line doc in ``metadata['doc']`` (printed by ``python -m app.config``)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _check(ok: bool, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{message}, got {value!r}")


@dataclass
class ModelKwargs:
    """Constructor options of the causal generator (reference: ``model_kwargs`` of the generator wrapper)."""

    local_attn_size: int = _f(-1, "KV-cache attention window in latent frames; -1 attends to every cached frame")
    sink_size: int = _f(0, "first latent frames kept in the cache when the window slides (attention sink)")

    def __post_init__(self) -> None:   # local_attn_size is checked against num_frame_per_block by Config
        _check(self.sink_size >= 0, "model_kwargs.sink_size must be >= 0", self.sink_size)


@dataclass
class Config:
    """Every key a stage YAML may set. Flat like the reference YAMLs, grouped by comments."""

    # --- stage and data ---
    trainer: str = _f(doc=f"training objective, one of {', '.join(TRAINERS)} (required)")
    generator_ckpt: Optional[str] = _f(None, "checkpoint that initialises the generator (and the CD teacher/EMA)")
    data_path: Optional[str] = _f(None, "training data: an LMDB folder (stages 1-2) or a prompt file (stage 3)")
    max_pair: Optional[int] = _f(None, "use at most this many dataset rows; null uses all")

    # --- networks (folders under wan_models_dir) ---
    wan_models_dir: str = _f("wan_models", "folder holding the downloaded Wan2.1 model folders")
    generator_name: str = _f("Wan2.1-T2V-1.3B", "model folder of the causal generator")
    real_name: str = _f("Wan2.1-T2V-1.3B", "model folder of the real-score (teacher) network")
    fake_name: str = _f("Wan2.1-T2V-1.3B", "model folder of the fake-score (critic) network")
    text_encoder_name: str = _f("Wan2.1-T2V-1.3B", "model folder providing the umT5 encoder, tokenizer and VAE")
    text_encoder_int8: bool = _f(False, "inference: store UMT5's linear layers and token embedding as int8 (groups "
                                 "of 128, a scale each): 5.8 GB instead of 11.4 (model/int8.py)")
    text_encoder_cache_size: int = _f(8, "prompts whose embeddings the text encoder keeps, least recently used "
                                      "dropped first (off over several ranks); a small caption set (the toy's 193) "
                                      "hits every step when it fits")
    model_kwargs: ModelKwargs = _f(ModelKwargs(), "generator constructor options")
    causal: bool = _f(True, "the generator is block-causal; false (bidirectional) only with trainer: diffusion")
    num_frame_per_block: int = _f(1, "latent frames per autoregressive block: 1 frame-wise, 3 chunk-wise")
    independent_first_frame: bool = _f(False, "latent frame 0 forms a block of its own")
    attention_backend: str = _f("auto", f"attention kernel, one of {', '.join(ATTENTION_BACKENDS)}")
    compile: bool = _f(False, "torch.compile the transformer blocks")

    # --- video geometry (height, width, num_frames: properties derived from the latent shape) ---
    image_or_video_shape: List[int] = _f([1, 21, 16, 60, 104], "latent shape [B, F, C, H, W] (480x832 pixels, 81 "
                                         "frames); B is set at run time")
    fps: int = _f(16, "frame rate of written videos")

    # --- diffusion schedule ---
    num_train_timestep: int = _f(1000, "number of training timesteps T (t lies in [0, T])")
    timestep_shift: float = _f(5.0, "flow-matching shift: the generator's 1000-step grid, DMD/critic timestep "
                               "sampling, the samplers (model_kwargs.timestep_shift is accepted as a copy)")
    denoising_step_list: Optional[List[int]] = _f(None, "few-step schedule, descending in (0, T]; null = multi-step")
    denoising_step_list_first_chunk: Optional[List[int]] = _f(None, "separate schedule for block 0; null = same")
    warp_denoising_step: bool = _f(False, "map the nominal steps onto the shifted 1000-step grid")
    context_noise: int = _f(0, "timestep of the KV-cache context pass after each block")
    sample_solver: str = _f("unipc", f"many-step sampler (no step list): {' or '.join(SAMPLE_SOLVERS)} (Wan's UniPC)")
    sample_steps: int = _f(50, "many-step sampler's solver steps per block (no step list; the published 50)")

    # --- guidance ---
    guidance_scale: float = _f(3.0, "classifier-free guidance scale (DMD real score, CD teacher, stage-1 sampling)")
    real_guidance_scale: Optional[float] = _f(None, "DMD real-score guidance; null = guidance_scale")
    fake_guidance_scale: Optional[float] = _f(None, "DMD fake-score guidance; null = 0 (no unconditional pass)")
    negative_prompt: str = _f(WAN_NEGATIVE_PROMPT, "unconditional prompt for guidance (the Wan2.1 one)")

    # --- optimisation ---
    seed: int = _f(0, "base random seed (rank r uses seed + r); 0 is a real seed, not 'random'")
    mixed_precision: bool = _f(True, "bf16 compute with fp32 master weights and reductions")
    gradient_checkpointing: bool = _f(True, "recompute each transformer block in the backward pass")
    lr: float = _f(2.0e-6, "generator AdamW learning rate")
    lr_critic: Optional[float] = _f(None, "critic AdamW learning rate; null = lr")
    beta1: float = _f(0.0, "generator AdamW beta1")
    beta2: float = _f(0.999, "generator AdamW beta2")
    beta1_critic: float = _f(0.0, "critic AdamW beta1")
    beta2_critic: float = _f(0.999, "critic AdamW beta2")
    weight_decay: float = _f(0.01, "AdamW weight decay (both optimizers)")
    batch_size: int = _f(1, "samples per GPU per micro-step")
    total_batch_size: Optional[int] = _f(None, "global batch; a multiple of batch_size x world size reached by "
                                         "gradient accumulation; null = batch_size x world size")
    max_grad_norm_generator: float = _f(10.0, "gradient clipping norm of the generator")
    max_grad_norm_critic: float = _f(10.0, "gradient clipping norm of the critic")
    ema_weight: float = _f(0.0, "EMA decay of the generator weights; 0 disables the EMA")
    ema_start_step: int = _f(0, "step from which the EMA is kept and release exports hold generator_ema (CD keeps "
                                  "its target EMA from step 0; there it only decides the export)")

    # --- stage 1 (diffusion) ---
    teacher_forcing: bool = _f(False, "condition on ground-truth clean context (true) or diffusion forcing (false)")
    noise_augmentation_max_timestep: int = _f(0, "noise the clean context up to this timestep; 0 disables")
    loss_weighting: str = _f("gaussian", "stage-1 loss weight over t: 'gaussian' (the reference's bell around "
                             "t = 500, mean 1) or 'uniform' (from-scratch models must learn the high-noise layout)")
    first_frame_loss_weight: float = _f(1.0, "weight of latent frame 0 in the loss relative to the others (the "
                                        "diffusion loss; in DMD the generator's distribution-matching loss) "
                                        "(frame weights rescaled to mean 1); frame 0 codes one pixel frame alone and "
                                        "has less spread than the rest; 1 = the reference")
    image_loss_weight: float = _f(0.0, "joint image training (Wan2.1 trains on images beside videos): latent frame 0 "
                                  "of each clip, which the causal VAE codes from pixel frame 0 alone, is also "
                                  "denoised as a one-frame sample with its own noise and timestep, and that loss, "
                                  "times this weight, is added to the clip's; bidirectional diffusion only "
                                  "(trainer: diffusion, causal: false); 0 = off, the reference")
    caption_dropout: float = _f(0.0, "probability that a training caption is replaced by the empty string \"\", "
                                "so classifier-free guidance has an unconditional model; 0 disables")
    draws_in_workers: bool = _f(False, "trainer: diffusion: make each sample's noise, timesteps and caption "
                                "dropout in the DataLoader worker that reads it (the same values): the training "
                                "process is spared about 0.1 ms a sample, /dev/shm carries the noise beside the "
                                "latent (2-3x the latent's bytes per sample in flight); for many small samples a "
                                "step (the toy: 192)")

    # --- stage 2b (consistency distillation) ---
    discrete_cd_N: int = _f(48, "number of discretisation steps of consistency distillation")

    # --- stage 3 (DMD with self-forcing rollout) ---
    dfake_gen_update_ratio: int = _f(5, "the generator steps when step % ratio == 0; the critic every step")
    denoising_loss_type: str = _f("flow", f"critic loss target, one of {', '.join(DENOISING_LOSS_TYPES)}")
    same_step_across_blocks: bool = _f(True, "all blocks of a rollout exit at the same denoising step")
    last_step_only: bool = _f(False, "every rollout block exits at the last denoising step")
    num_training_frames: Optional[int] = _f(None, "latent frames the rollout generates and trains (its KV-cache "
                                            "length), at most image_or_video_shape[1] (with rolling_forcing: the "
                                            "most it generates, at least that); null = that")
    ts_schedule: bool = _f(False, "lower the DMD/critic timestep bound to the rollout's exit step")
    ts_schedule_max: bool = _f(False, "upper the DMD/critic timestep bound to the rollout's exit step")
    min_score_timestep: int = _f(0, "lowest DMD/critic timestep when ts_schedule is off")

    # --- long video: Rolling Forcing (the published long_video/) ---
    rolling_forcing: bool = _f(False, "Rolling Forcing: denoise windows of len(denoising_step_list) blocks at "
                               "staggered steps; DMD rolls out up to num_training_frames and distills the last "
                               "image_or_video_shape[1]; attends to model_kwargs.local_attn_size frames (-1: "
                               "image_or_video_shape[1]), model_kwargs.sink_size sinks (0: one block)")

    # --- distribution (FSDP) ---
    sharding_strategy: str = _f("hybrid_full", f"FSDP sharding, one of {', '.join(SHARDING_STRATEGIES)}")
    text_encoder_cpu_offload: bool = _f(False, "keep the text encoder's parameters on the CPU")
    real_score_cpu_offload: bool = _f(False, "keep the real score's parameters on the CPU")

    # --- run length, checkpoints, logging ---
    max_steps: int = _f(0, "stop after this many steps; 0 = run until stopped")
    log_iters: int = _f(1000, "checkpoint interval in steps (reference name kept)")
    log_every: int = _f(10, "metrics logging interval in steps")
    gc_interval: int = _f(100, "Python garbage-collection interval in steps; 0 = never")
    wandb_mode: str = _f("disabled", f"Weights & Biases mode, one of {', '.join(WANDB_MODES)}; key from WANDB_API_KEY")
    wandb_project: str = _f("causal-forcing", "W&B project")
    wandb_entity: Optional[str] = _f(None, "W&B entity; null = the key's default")
    wandb_name: Optional[str] = _f(None, "W&B run name; null = config_name")
    sample_prompts: Optional[List[str]] = _f(None, "prompts of the sample videos of each checkpoint; null = built-in")

    # --- runtime: set by train.py from its flags, not by YAML ---
    logdir: str = _f("", "output folder of checkpoints and logs")
    config_name: str = _f("", "stem of the config file; load_config fills it")
    no_save: bool = _f(False, "write no checkpoints")
    no_visualize: bool = _f(False, "write no sample videos at checkpoints (<logdir>/samples/, W&B)")
    disable_wandb: bool = _f(False, "force W&B off whatever wandb_mode says")
    wandb_save_dir: str = _f("", "folder for W&B files; empty = logdir")

    def __post_init__(self) -> None:
        """Reject bad values (one message, first problem found) and resolve the documented null fallbacks."""
        self._check_stage()
        self._check_schedule()
        self._check_optim()
        for key, fallback in (("lr_critic", self.lr), ("real_guidance_scale", self.guidance_scale),
                              ("fake_guidance_scale", 0.0)):
            if getattr(self, key) is None:
                setattr(self, key, fallback)

    # The pixel geometry, derived from the latent shape (the VAE encodes frame 0 alone, then 4 frames per latent).
    @property
    def height(self) -> int:
        return self.image_or_video_shape[3] * VAE_SPATIAL_STRIDE

    @property
    def width(self) -> int:
        return self.image_or_video_shape[4] * VAE_SPATIAL_STRIDE

    @property
    def num_frames(self) -> int:
        return 1 + VAE_TEMPORAL_STRIDE * (self.image_or_video_shape[1] - 1)

    def _check_stage(self) -> None:
        for key, choices in CHOICES.items():
            _check(getattr(self, key) in choices, f"{key} must be one of {', '.join(choices)}", getattr(self, key))
        _check(self.causal or self.trainer == "diffusion", "causal: false (a bidirectional generator) needs "
               "trainer: diffusion", self.causal)
        _check(self.image_loss_weight == 0 or (self.trainer == "diffusion" and not self.causal),
               "image_loss_weight is read by the bidirectional base's diffusion loss only (trainer: diffusion, "
               "causal: false); set it to 0", self.image_loss_weight)
        for key, low in MINIMUMS.items():
            value = getattr(self, key)
            _check(value is None or value >= low, f"{key} must be >= {low}", value)
        k = self.num_frame_per_block
        local = self.model_kwargs.local_attn_size
        _check(local == -1 or local >= k, f"model_kwargs.local_attn_size must be -1 or >= num_frame_per_block ({k})",
               local)
        shape = self.image_or_video_shape
        _check(len(shape) == 5 and min(shape) >= 1, "image_or_video_shape must be 5 positive ints [B, F, C, H, W]",
               shape)
        if self.num_training_frames is None:   # the documented null: the clip's latent length
            self.num_training_frames = shape[1]
        if self.rolling_forcing:
            self._check_rolling()
        else:   # longer rollouts that distill their last clip are Rolling Forcing's (published long-video setting)
            _check(self.num_training_frames <= shape[1], f"num_training_frames must be <= image_or_video_shape[1] "
                   f"({shape[1]}) unless rolling_forcing: true", self.num_training_frames)
        for key, frames in (("image_or_video_shape[1]", shape[1]), ("num_training_frames", self.num_training_frames)):
            rest = frames - 1 if self.independent_first_frame else frames
            _check(frames >= 1 and rest % k == 0, f"{key} must split into blocks of num_frame_per_block={k}"
                   + (" after the independent first frame" if self.independent_first_frame else ""), frames)

    def _check_rolling(self) -> None:
        steps, k = self.denoising_step_list, self.num_frame_per_block
        _check(steps is not None, "rolling_forcing needs a few-step denoising_step_list", steps)
        _check(self.denoising_step_list_first_chunk is None, "rolling_forcing denoises every block with "
               "denoising_step_list: drop denoising_step_list_first_chunk", self.denoising_step_list_first_chunk)
        _check(not self.independent_first_frame, "rolling_forcing needs blocks of equal size: "
               "independent_first_frame must be false", self.independent_first_frame)
        _check(self.num_training_frames >= self.image_or_video_shape[1], "with rolling_forcing, num_training_frames "
               f"must be >= image_or_video_shape[1] ({self.image_or_video_shape[1]}, the clip it distills)",
               self.num_training_frames)
        window = len(steps) * k
        _check(self.rolling_span >= self.rolling_sink + window, f"rolling_forcing: the attention span "
               f"(model_kwargs.local_attn_size; -1 = image_or_video_shape[1]) must hold the {self.rolling_sink} "
               f"sink frames and a window of len(denoising_step_list) x num_frame_per_block = {window} frames",
               self.rolling_span)

    @property
    def rolling_span(self) -> int:
        """Frames one Rolling Forcing call attends to in all."""
        local = self.model_kwargs.local_attn_size
        return local if local > 0 else self.image_or_video_shape[1]

    @property
    def rolling_sink(self) -> int:
        """Rolling Forcing's sink ("anchor") frames."""
        return self.model_kwargs.sink_size or self.num_frame_per_block

    def _check_schedule(self) -> None:
        T = self.num_train_timestep
        _check(self.timestep_shift > 0, "timestep_shift must be > 0", self.timestep_shift)
        for key in ("denoising_step_list", "denoising_step_list_first_chunk"):
            steps = getattr(self, key)
            if steps is None:
                continue
            _check(len(steps) >= 1, f"{key} must not be empty (use null for the multi-step sampler)", steps)
            _check(all(0 < s <= T for s in steps), f"{key} values must lie in (0, {T}] (drop a trailing 0)", steps)
            _check(all(a > b for a, b in zip(steps, steps[1:])), f"{key} must be strictly descending", steps)
        _check(0 <= self.context_noise <= T, f"context_noise must lie in [0, {T}]", self.context_noise)
        _check(0 <= self.noise_augmentation_max_timestep < T, f"noise_augmentation_max_timestep must lie in [0, {T})",
               self.noise_augmentation_max_timestep)
        _check(0 <= self.min_score_timestep < T, f"min_score_timestep must lie in [0, {T})", self.min_score_timestep)

    def _check_optim(self) -> None:
        for key in ("lr", "lr_critic", "max_grad_norm_generator", "max_grad_norm_critic"):
            value = getattr(self, key)   # .inf or .nan would train nothing useful without any error
            _check(value is None or 0 < value < float("inf"), f"{key} must be a finite number > 0", value)
        _check(0 < self.first_frame_loss_weight < float("inf"), "first_frame_loss_weight must be a finite number > 0",
               self.first_frame_loss_weight)
        _check(0 <= self.image_loss_weight < float("inf"), "image_loss_weight must be a finite number >= 0",
               self.image_loss_weight)
        _check(0 <= self.caption_dropout <= 1, "caption_dropout must lie in [0, 1]", self.caption_dropout)
        _check(self.text_encoder_cache_size >= 0, "text_encoder_cache_size must be >= 0 (0: no cache)",
               self.text_encoder_cache_size)
        for key in ("beta1", "beta2", "beta1_critic", "beta2_critic", "ema_weight"):
            _check(0 <= getattr(self, key) < 1, f"{key} must lie in [0, 1)", getattr(self, key))
        _check(0 <= self.weight_decay < float("inf"), "weight_decay must be a finite number >= 0", self.weight_decay)
        _check(0 <= self.seed < 2**63, "seed must lie in [0, 2^63)", self.seed)
        total = self.total_batch_size
        _check(total is None or (total >= 1 and total % self.batch_size == 0),
               f"total_batch_size must be a positive multiple of batch_size ({self.batch_size}) or null", total)


CHOICES = {"trainer": TRAINERS, "attention_backend": ATTENTION_BACKENDS, "sample_solver": SAMPLE_SOLVERS,
           "sharding_strategy": SHARDING_STRATEGIES, "wandb_mode": WANDB_MODES,
           "denoising_loss_type": DENOISING_LOSS_TYPES, "loss_weighting": LOSS_WEIGHTINGS}
# Keys with a lower bound (null passes; checked first, so the rules below may divide by them).
MINIMUMS = {"num_frame_per_block": 1, "fps": 1, "num_train_timestep": 1, "discrete_cd_N": 2, "batch_size": 1,
            "ema_start_step": 0, "max_steps": 0, "gc_interval": 0, "log_iters": 1, "log_every": 1, "max_pair": 1,
            "sample_steps": 1, "dfake_gen_update_ratio": 1, "guidance_scale": 0, "real_guidance_scale": 0,
            "fake_guidance_scale": 0}
# Keys a YAML may give although their value derives from another key (published YAMLs give both):
# key -> (the source key, the derived value). load_config checks each copy against its source.
COPIES = {
    "height": ("image_or_video_shape", lambda cfg: cfg.height),
    "width": ("image_or_video_shape", lambda cfg: cfg.width),
    "num_frames": ("image_or_video_shape", lambda cfg: cfg.num_frames),
    "model_kwargs.timestep_shift": ("timestep_shift", lambda cfg: cfg.timestep_shift),
}
# Top-level keys holding text: where a `{your entity}` placeholder means "unset".
STRING_KEYS = frozenset(k for k, t in get_type_hints(Config).items() if t in (str, Optional[str]))


def load_config(path: Union[str, Path], overrides: Optional[List[str]] = None) -> Config:
    """A stage YAML plus dotlist ``overrides`` (``["lr=1e-5"]``) as a validated :class:`Config`; ``config_name`` is
    the file's stem unless set. Any problem raises a one-line :class:`ConfigError` naming the file."""
    path = Path(in_repository(path))   # a shipped config is found from any working directory
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    layers: List[Tuple[str, DictConfig, bool]] = []   # (source, node, read as a published YAML)
    default = find_default_config(path)
    if default is not None and default.resolve() != path.resolve():
        layers += read_chain(default, ())
    layers += read_chain(path, ())
    published_rolling_forcing(path, layers)
    layers += [read_override(item) for item in overrides or []]

    merged = OmegaConf.structured(Config)
    copies: Dict[str, Tuple[int, str, Any]] = {}   # copy key -> (layer, source, value) of the last layer giving it
    set_at: Dict[str, int] = {}                    # source key of a copy -> last layer setting it
    for i, (source, node, published) in enumerate(layers):
        adapt_layer(node, source, STRING_KEYS, published)
        for key, (origin, _) in COPIES.items():
            parent, _, leaf = key.rpartition(".")
            holder = node.get(parent) if parent else node
            if isinstance(holder, DictConfig) and leaf in holder:
                copies[key] = (i, source, holder.pop(leaf))
            if origin in node:
                set_at[origin] = i
        check_keys(node, Config, source)
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {describe_type_error(e, Config)}") from None
    merged.config_name = merged.config_name or path.stem
    try:
        cfg = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{path}: missing required key '{e.full_key}'") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    for key, (i, source, value) in copies.items():
        origin, derive = COPIES[key]
        if i >= set_at.get(origin, -1) and value != derive(cfg):   # a later layer's source supersedes the copy
            raise ConfigError(f"{source}: {key} {value!r} does not match {origin} (which gives {derive(cfg)!r}); "
                              f"drop {key} (it is derived from {origin}) or make the two agree")
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain nested dict of ``cfg`` (for W&B, JSON, checkpoints)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step so that ``batch_size x world_size x steps == total_batch_size``."""
    per_step = cfg.batch_size * world_size
    if cfg.total_batch_size is None:
        return 1
    if cfg.total_batch_size % per_step:
        raise ConfigError(f"total_batch_size {cfg.total_batch_size} is not a multiple of batch_size x world size = "
                          f"{cfg.batch_size} x {world_size}; change it or set it to null")
    return cfg.total_batch_size // per_step
