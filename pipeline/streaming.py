"""The user-facing streaming API (README.md, "From Python"): prompts in, decoded frames out, block by block, through
:class:`~pipeline.causal.BlockLoop` at constant memory (past the training length a sliding window with sink frames,
noise drawn per block). ``num_frames`` counts video frames (``4k + 1``, as in diffusers); ``num_latent_frames``
counts latent frames, the unit of the published ``--num_output_frames``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from model.fp8 import check_fp8_device, convert_to_fp8
from model.kv_cache import KVCache
from model.preview_decoder import TinyVideoDecoder
from model.scheduler import FlowMatchScheduler
from model.text_encoder import TextEncoder
from model.vae import WanVAE
from model.wan import WanModel
from pipeline import components as C
from pipeline.api import OUTPUT_TYPES, as_output_type, latent_frames_for, pretrained_config
from pipeline.causal import BlockLoop, CacheViews, Guidance, StepSchedule, randn_like_from
from pipeline.graphs import CUDAGraphs
from utils.config import Config
from utils.errors import ConfigError
from utils.video import pixels_to_uint8

log = logging.getLogger(__name__)


@dataclass
class StreamChunk:
    """A generated block, decoded; a video's first block (without I2V frames) comes as two: its first frame at
    once, then the rest."""

    block_index: int              # among generated blocks (0 = first)
    start_frame: int              # first latent frame (absolute, prefill included)
    latents: torch.Tensor         # [B, n, C, h, w]
    frames: torch.Tensor | None   # float [B, T, 3, H, W] in [-1, 1], or (uint8=True) uint8 [B, T, H, W, 3] on the host
    prompt: str | list[str]       # the prompt this block was generated under
    switched: bool = False        # a prompt switch took effect at this block
    seconds: float = 0.0          # wall time since the previous chunk (generation + decode)


@dataclass
class VideoOutput:
    """A whole video from :meth:`StreamingPipeline.generate`."""

    frames: object                # as ``output_type`` (see :meth:`StreamingPipeline.generate`)
    latents: torch.Tensor         # [B, F, C, h, w], the initial latent included


@dataclass
class StreamingPipeline:
    """Causal generator + text encoder + VAE, ready to stream videos."""

    generator: WanModel
    text_encoder: TextEncoder | None           # None: callers pass precomputed embeddings to open()
    vae: WanVAE | None
    scheduler: FlowMatchScheduler
    schedule: StepSchedule
    latent_shape: tuple[int, int, int]          # (C, h, w) of one latent frame
    context_noise: float = 0.0
    negative_prompt: str = ""
    guidance_scale: float = 1.0                 # > 1 only for the many-step sampler
    local_attn_size: int = -1
    sink_size: int = 0
    rolling_span: int = 0                       # Rolling Forcing: frames each call attends to; 0 = block by block
    default_num_frames: int = 21               # latent frames when a call gives no length (the training length)
    fps: int = 16                               # frame rate the model was trained at (for writing videos)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    overlap_decode: bool = False                # CUDA: decode block b on a side stream while block b+1 is denoised
    preview_decoder: TinyVideoDecoder | None = None  # decodes the stream instead of the VAE (fast, lower quality)
    graphs: CUDAGraphs | None = None            # CUDA: the denoising forwards replayed from CUDA graphs
    # the CUDA stream overlapped decodes run on, one per pipeline (docs/architecture.md, "Decode beside the DiT")
    side_stream: torch.cuda.Stream | None = field(default=None, init=False, repr=False)

    @property
    def frame_decoder(self):
        """The preview decoder when one is given, else the VAE (None: no decoding)."""
        return self.preview_decoder if self.preview_decoder is not None else self.vae

    def enable_fast_path(self, compile: bool = True, overlap_decode: bool = True, graphs: bool | None = None):
        """The CUDA fast path (docs/architecture.md): cuDNN autotuning, fused q/k/v, compiled DiT and VAE regions, CUDA
        graphs (``graphs`` defaults to ``compile``), overlapped decode. ``compile=False``: eager. No-op on the CPU."""
        if self.device.type != "cuda":
            return self
        # process-wide, as torch has it; the VAE's 3-D convolutions see a handful of shapes. Every cuDNN algorithm
        # timed, not PyTorch's first 10: the full-resolution 96-channel convolution 1.39 instead of 2.10 ms on an H100,
        # end to end +0.4-1.0% (docs/performance.md); the search runs once per shape, in the first video.
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.benchmark_limit = 0
        self.generator.fuse_qkv()
        if compile:
            self.generator.compile_blocks()
        if self.frame_decoder is not None:
            self.frame_decoder.compile_decoder(compile)
        self.overlap_decode = overlap_decode
        self.graphs = CUDAGraphs(self.generator) if (compile if graphs is None else graphs) else None
        log.info("fast path: compiled DiT and VAE regions %s, CUDA graphs %s, overlapped decode %s", compile,
                 self.graphs is not None, overlap_decode)
        return self

    @classmethod
    def from_pretrained(cls, name: str, checkpoint: str | None = None, use_ema: bool | None = None,
                        overrides: list[str] | None = None, **kwargs) -> "StreamingPipeline":
        """Build from a YAML path, a shipped config's name or a released checkpoint
        (:func:`pipeline.api.pretrained_config`). ``checkpoint``: the generator weights (default: the released file,
        else ``generator_ckpt``); ``overrides``: ``["key=value", ...]``; ``kwargs`` go to :meth:`from_config`."""
        cfg, checkpoint, use_ema = pretrained_config(name, checkpoint, use_ema, overrides)
        return cls.from_config(cfg, checkpoint, use_ema, **kwargs)

    @classmethod
    def from_config(cls, cfg: Config, checkpoint_path: str | None = None, use_ema: bool = False, device=None,
                    dtype=None, text_encoder_device=None, decode: bool = True, fast: bool = True,
                    compile: bool = True, preview_decoder: str | None = None, fp8: bool = False) -> "StreamingPipeline":
        """Build everything ``cfg`` names (GPU: bf16; CPU: float32). ``fast``: :meth:`enable_fast_path` on CUDA.
        ``preview_decoder``: a TAEHV file that decodes instead of the Wan VAE. ``fp8``: block products in fp8.
        ``text_encoder_device``: default :func:`pipeline.components.placed_text_encoder`."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        generator = C.build_generator(cfg, checkpoint_path, use_ema, device=device, dtype=dtype).eval()
        if fp8:   # the generator's block products in fp8
            check_fp8_device(device)
            convert_to_fp8(generator)
        vae = C.build_vae(cfg, device=device, dtype=dtype) if decode else None
        preview = TinyVideoDecoder.from_file(preview_decoder, device=device, dtype=dtype) \
            if decode and preview_decoder else None
        for decoder in (vae, preview):
            if decoder is not None and device.type == "cuda":
                decoder.to_channels_last()  # faster cuDNN 3-D convolutions (libraries.md §9)
        text_encoder = C.placed_text_encoder(cfg, generator, device, dtype, text_encoder_device)
        pipe = cls.from_networks(cfg, generator, text_encoder, vae, device, dtype, preview)
        return pipe.enable_fast_path(compile) if fast else pipe

    @classmethod
    def from_networks(cls, cfg: Config, generator: WanModel, text_encoder: TextEncoder | None, vae: WanVAE | None,
                      device: torch.device, dtype: torch.dtype,
                      preview: TinyVideoDecoder | None = None) -> "StreamingPipeline":
        """A pipeline over networks built already (the training loop's sample videos pass its own)."""
        scheduler = C.build_scheduler(cfg)
        multistep = cfg.denoising_step_list is None
        schedule = StepSchedule.multistep(scheduler, cfg.sample_steps, cfg.timestep_shift, cfg.sample_solver) \
            if multistep else StepSchedule.from_config(scheduler, cfg.denoising_step_list,
                                                       cfg.denoising_step_list_first_chunk, cfg.warp_denoising_step)
        shape = cfg.image_or_video_shape
        rolling = cfg.rolling_forcing
        return cls(generator, text_encoder, vae, scheduler, schedule, latent_shape=tuple(shape[2:]),
                   context_noise=float(cfg.context_noise), negative_prompt=cfg.negative_prompt,
                   guidance_scale=cfg.guidance_scale if multistep else 1.0,
                   local_attn_size=cfg.model_kwargs.local_attn_size,
                   sink_size=cfg.rolling_sink if rolling else cfg.model_kwargs.sink_size,
                   rolling_span=cfg.rolling_span if rolling else 0, default_num_frames=shape[1], fps=cfg.fps,
                   device=torch.device(device), dtype=dtype, preview_decoder=preview)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    def window(self, total_frames: int | None) -> tuple[int, int]:
        """Cache window and sink (frames) for ``total_frames`` latent frames (None: endless): Rolling Forcing's, else
        the configured window, else past the training length a window of that length with one block of sink."""
        if self.rolling_span:
            return self.rolling_span + self.sink_size, self.sink_size
        if self.local_attn_size > 0:
            return self.local_attn_size, self.sink_size
        if total_frames is not None and total_frames <= self.default_num_frames:
            return total_frames, 0
        sink = self.generator.num_frame_per_block
        log.info("%s latent frames exceed the training length %d: local window %d frames with %d sink frames",
                 total_frames or "endless", self.default_num_frames, self.default_num_frames, sink)
        return self.default_num_frames, sink

    def num_latent_frames(self, num_frames: int | None = None, num_latent_frames: int | None = None,
                          prefix: int = 0) -> int:
        """Latent frames to generate after ``prefix``, from ``num_frames`` (the whole video, prefix included) or
        ``num_latent_frames``; neither: the training length."""
        if num_frames is not None and num_latent_frames is not None:
            raise ValueError("give num_frames (video frames) or num_latent_frames, not both")
        if num_frames is None:
            return num_latent_frames or self.default_num_frames
        return latent_frames_for(num_frames, prefix, self.generator.layout.tiles, self.generator.num_frame_per_block)

    def open(self, prompt: str | list[str], num_frames: int | None = None, *, num_latent_frames: int | None = None,
             seed: int = 0, generator: torch.Generator | None = None, initial_latent: torch.Tensor | None = None,
             decode: bool = True, context: torch.Tensor | None = None, uint8: bool = False,
             endless: bool = False) -> "VideoStream":
        """Start a video of ``num_frames`` video frames or ``num_latent_frames`` latent frames after the optional
        ``initial_latent [B, f0, C, h, w]`` (I2V, extension); ``endless``: until the caller stops. ``generator``
        seeds it with its next draw instead of ``seed``; ``context``: precomputed prompt embeddings ``[B, L,
        text_dim]``; ``uint8``: frames as uint8 ``[B, T, H, W, 3]`` on the host."""
        prefix = 0 if initial_latent is None else initial_latent.shape[1]
        count = None if endless else self.num_latent_frames(num_frames, num_latent_frames, prefix)
        if generator is not None:
            seed = int(torch.randint(2**63 - 1, (1,), generator=generator, device=generator.device))
        return VideoStream(self, prompt, count, seed, initial_latent, decode, context, uint8)

    def generate(self, prompt: str | list[str], num_frames: int | None = None, *,
                 num_latent_frames: int | None = None, seed: int = 0, generator: torch.Generator | None = None,
                 initial_latent: torch.Tensor | None = None, output_type: str = "np") -> VideoOutput:
        """A whole video (arguments as :meth:`open`). ``output_type``: ``"np"`` uint8 ``[B, T, H, W, 3]``, ``"pil"``
        B lists of PIL images, ``"pt"`` float ``[B, T, 3, H, W]`` in [-1, 1], ``"latent"`` no frames (None)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        decode = output_type != "latent"
        chunks = list(self.open(prompt, num_frames, num_latent_frames=num_latent_frames, seed=seed, generator=generator,
                                initial_latent=initial_latent, decode=decode, uint8=output_type in ("np", "pil")))
        latents = torch.cat([c.latents for c in chunks], 1)
        if initial_latent is not None:
            latents = torch.cat([initial_latent.to(latents), latents], 1)
        frames = torch.cat([c.frames for c in chunks], 1) if decode else None
        return VideoOutput(as_output_type(frames, output_type), latents)


class VideoStream:
    """Iterator over the :class:`StreamChunk` of one video; see :meth:`StreamingPipeline.open`."""

    def __init__(self, pipe: StreamingPipeline, prompt, num_frames: int | None, seed: int,
                 initial_latent: torch.Tensor | None, decode: bool, context: torch.Tensor | None = None,
                 uint8: bool = False):
        self.pipe = pipe
        self.uint8 = uint8
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        _, h, w = pipe.latent_shape
        self.prefix = initial_latent.to(pipe.device, pipe.dtype) if initial_latent is not None else None
        self.start_frame = 0 if self.prefix is None else self.prefix.shape[1]
        self.num_frames = num_frames                  # None: endless
        total = None if num_frames is None else self.start_frame + num_frames
        layout = pipe.generator.layout
        if total is not None:
            layout.block_sizes(total)                 # frame count must tile into blocks: fail before any work
        self.rng = torch.Generator(pipe.device).manual_seed(seed)
        window, sink = pipe.window(total)
        guided = pipe.guidance_scale != 1.0
        rows = len(self.prompts) * (2 if guided else 1)
        # the fast path's kept cache (its graphs read it), unless another stream holds it
        leased = pipe.graphs.lease(self, rows, h, w, window, sink, pipe.dtype) if pipe.graphs is not None else None
        self.leased = leased is not None
        self.cache = leased if self.leased else KVCache.for_model(pipe.generator, rows, h, w, window, sink,
                                                                  dtype=pipe.dtype, device=pipe.device)
        # the longest call: a block, two fused blocks (only before the window fills) or a rolling window
        steps = len(pipe.schedule.timesteps) if pipe.rolling_span else 1
        try:
            self.cache.check_positions(steps * layout.frames_per_block)   # a stream of any length, checked now
        except ValueError as e:
            self.close()
            raise ConfigError(f"model_kwargs.local_attn_size: {e}") from None
        negative = pipe.encode([pipe.negative_prompt]) if guided else None
        views = CacheViews.rolling(pipe.rolling_span) if pipe.rolling_span else CacheViews()
        self.loop = BlockLoop(pipe.graphs if self.leased else pipe.generator, pipe.scheduler, pipe.schedule,
                              Guidance(pipe.encode(self.prompts) if context is None else context.to(pipe.dtype),
                                       negative, pipe.guidance_scale), self.cache,
                              context_noise=pipe.context_noise, noise_fn=randn_like_from(self.rng),
                              fuse_context=True, views=views)  # each context pass inside the next block's first step
        source = pipe.frame_decoder
        # one latent frame per decoder call: the lowest peak memory, and every steady call has the same shapes
        self.decoder = source.stream(frames_per_call=1) if decode and source is not None else None
        self.held: list[tuple[int, torch.Tensor]] = [] if self.prefix is None else [(0, self.prefix)]
        self._pending: tuple[list[str], bool, torch.Tensor | None] | None = None
        overlap = pipe.overlap_decode and self.decoder is not None and pipe.device.type == "cuda"
        if overlap and pipe.side_stream is None:
            pipe.side_stream = torch.cuda.Stream(pipe.device)
        self._side = pipe.side_stream if overlap else None
        self._due: tuple[torch.Tensor, int] | None = None   # context pass of the last block, run with the next
        self._iter = None

    def switch_prompt(self, prompt: str | list[str], recache: bool = False,
                      context: torch.Tensor | None = None) -> None:
        """Use ``prompt`` (or its embeddings ``context``) from the next block on (Rolling Forcing: the next window);
        ``recache`` re-encodes the cached frames under it, otherwise only the cross-attention cache changes."""
        prompts = [prompt] * len(self.prompts) if isinstance(prompt, str) else list(prompt)
        self._pending = (prompts, recache, context)

    def _apply_switch(self) -> bool:
        if self._pending is None:
            return False
        (prompts, recache, context), self._pending = self._pending, None
        if self._due is not None:  # the last block's context pass belongs to the prompt it was made under
            self.loop.commit(*self._due)
            self._due = None
        self.prompts = prompts
        self.loop.guidance.context = self.pipe.encode(prompts) if context is None else context.to(self.pipe.dtype)
        self.cache.reset_cross()
        if recache and self.held:
            self.cache.reset()
            for frame, latents in self.held:
                self.cache.skip_to(frame)
                self.loop.prefill(latents, frame)
        return True

    def _hold(self, frame: int, x0: torch.Tensor) -> None:
        """Keep a block's latents while the cache holds its frames (for ``recache``): the sink and the window."""
        self.held.append((frame, x0))
        first = max(self.cache.sink, frame + x0.shape[1] - self.cache.ring)   # the window's oldest frame
        self.held = [(f, x) for f, x in self.held if f < self.cache.sink or f + x.shape[1] > first]

    def _block_noise(self, start_frame: int, n: int) -> torch.Tensor:
        """A block's initial noise, drawn when the block starts (an endless video cannot draw it up front)."""
        return torch.randn((len(self.prompts), n, *self.pipe.latent_shape), generator=self.rng,
                           device=self.pipe.device, dtype=self.pipe.dtype)

    def _blocks(self):
        """``(block index, start frame, x0, switched)`` of each block as it becomes final."""
        if self.pipe.rolling_span:
            n = self.pipe.generator.num_frame_per_block
            blocks = None if self.num_frames is None else self.num_frames // n
            index, switched = 0, self._apply_switch()
            for result in self.loop.rolling(self._block_noise, self.start_frame, blocks):   # a window per next()
                if result.final is not None:
                    yield index, *result.final, switched
                    index, switched = index + 1, False
                switched = self._apply_switch() or switched
            return
        frame = self.start_frame
        for i, n in enumerate(self.loop._blocks_from(self.start_frame, self.num_frames)):
            switched = self._apply_switch()
            x0 = self.loop.denoise(self._block_noise(frame, n), frame, i, pending=self._due)
            self._due = (x0, frame)  # written into the cache with (or before) the next block's first step
            yield i, frame, x0, switched
            frame += n

    @torch.no_grad()
    def _run(self):
        """Blocks in order; with ``overlap_decode`` block b is handed out after block b+1's DiT work is queued (its
        decode runs beside it); the first frame goes out at once."""
        if self.prefix is not None:
            self.loop.prefill(self.prefix, 0)
        held = None
        self._t_last = time.perf_counter()
        for i, frame, x0, switched in self._blocks():
            self._hold(frame, x0)
            n = x0.shape[1]   # a video's first frame goes out alone
            alone = i == 0 and n > 1 and self.prefix is None and self.decoder is not None
            parts = [(0, 1), (1, n)] if alone else [(0, n)]
            for j, (a, b) in enumerate(parts):
                latents = x0[:, a:b]
                pixels = torch.cat([self.prefix, latents], 1) if (i == 0 and self.prefix is not None) else latents
                chunk = StreamChunk(i, frame + a, latents, self._decode(pixels), list(self.prompts),
                                    switched and a == 0)
                if held is not None:
                    yield self._hand_out(held)
                    held = None
                if self._side is not None and j == len(parts) - 1 and (i > 0 or j > 0):
                    held = chunk   # decoded beside the next block's DiT work
                else:
                    yield self._hand_out(chunk)  # the video's first frame, or the serial path
        if held is not None:
            yield self._hand_out(held)
        self.close()

    def _hand_out(self, chunk: StreamChunk) -> StreamChunk:
        """Get the chunk's frames (run its deferred decode, or wait for its host copy) and stamp the wall time."""
        if callable(chunk.frames):
            chunk.frames = chunk.frames()
        now = time.perf_counter()
        chunk.seconds, self._t_last = now - self._t_last, now
        return chunk

    def _decode(self, latents: torch.Tensor):
        """A function giving the chunk's frames: its decode, run when handed out (in order, for the decoder's causal
        cache), or a wait for the host copy of a decode queued now on the side stream."""
        if self.decoder is None:
            return None
        if self._side is None:
            return lambda: self._decode_now(latents)
        self._side.wait_stream(torch.cuda.current_stream(latents.device))  # the block's DiT work comes first
        latents.record_stream(self._side)  # freed on the main stream only after the side stream used it
        with torch.cuda.stream(self._side):
            frames = self.decoder.decode_chunk(latents)
            if self.uint8:
                frames = pixels_to_uint8(frames)
            host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record()

        def wait() -> torch.Tensor:
            done.synchronize()
            return host
        return wait

    def _decode_now(self, latents: torch.Tensor) -> torch.Tensor:
        frames = self.decoder.decode_chunk(latents)
        return pixels_to_uint8(frames).cpu() if self.uint8 else frames

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:
            self._iter = self._run()
        return next(self._iter)

    def close(self) -> None:
        """Free the KV cache now (a stopped stream must not hold GPU memory), or hand the fast path's back."""
        self.pipe.graphs.release(self) if self.leased else self.cache.free()
        self.held = []
