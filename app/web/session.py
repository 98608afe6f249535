"""One demo generation: checking a client's request, running it on the GPU worker thread, encoding its frames.

The worker thread (one per process, shared by every generation) owns the :class:`~pipeline.streaming.VideoStream`:
it applies prompt switches between blocks (so a switch takes effect at the next block boundary, the stream's own
mechanism), copies each decoded block to the host as uint8, and hands it to two single-thread executors, one that
JPEG-encodes the frames and emits them in order, one that appends them to the mp4 (so neither slows the next block's
generation). Stopping is checked between blocks; at the end the stream's KV cache and decoder caches are released
before the generation counts as finished.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline
from utils.errors import UserError
from utils.video import Mp4StreamWriter, safe_output_name

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000      # UMT5 keeps at most text_len (512) tokens; longer text is only wasted work
MAX_SEED = 2**32 - 1         # also exact in the page's JavaScript numbers
MAX_QUEUED_BLOCKS = 8        # decoded blocks that may wait for the JPEG encoder or the mp4 writer before generation
                             # waits for them (a few MB at 480p): memory stays flat however long a video runs
STEP_COUNTS = (1, 2, 4)      # sub-schedules offered besides the model's own step count


class RequestError(UserError):
    """A client's message is malformed or out of range; the message goes back to the client as is."""


@dataclass
class DemoSettings:
    """What the page may ask for, derived from the model and config (sent to the page on connect)."""

    fps: int
    height: int
    width: int
    frames_per_block: int                     # latent frames per block: 1 frame-wise, 3 chunk-wise
    independent_first_frame: bool
    default_frames: int                       # latent frames (the training length)
    max_frames: int                           # latent frames
    schedules: dict[int, StepSchedule]        # steps per block -> schedule
    default_steps: int
    window: int                               # cache window for long videos (latent frames)
    temporal_compression: int
    multistep: bool = False                   # many-step Stage-1 sampler (Euler + guidance), no step choice
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_seed: int = MAX_SEED
    jpeg_quality: int = 90

    def describe(self) -> dict:
        """The page's view of these settings (JSON)."""
        return dict(fps=self.fps, height=self.height, width=self.width, frames_per_block=self.frames_per_block,
                    independent_first_frame=self.independent_first_frame, default_frames=self.default_frames,
                    max_frames=self.max_frames, steps=sorted(self.schedules), default_steps=self.default_steps,
                    window=self.window, temporal_compression=self.temporal_compression, multistep=self.multistep,
                    max_prompt_chars=self.max_prompt_chars, max_seed=self.max_seed,
                    mode="frame-wise" if self.frames_per_block == 1 else "chunk-wise")

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_compression * (latent_frames - 1)


def step_schedules(pipe: StreamingPipeline, cfg) -> dict[int, StepSchedule]:
    """Steps per block the model supports -> schedule.

    The configured list is the model's own (and the default). A few-step list of N steps also offers every count
    in 1/2/4 that divides N, as the evenly spaced sub-list (4-step [1000, 750, 500, 250] -> 2-step [1000, 500],
    1-step [1000]); block 0 keeps the full list, as the Causal Forcing++ 1/2-step configs do, because the first
    block has no cached context to lean on. The many-step sampler has no choice.
    """
    if cfg.denoising_step_list is None:
        return {len(pipe.schedule.timesteps): pipe.schedule}
    nominal = [s for s in cfg.denoising_step_list if s != 0]
    first = cfg.denoising_step_list_first_chunk or nominal
    out = {len(nominal): pipe.schedule}
    for k in STEP_COUNTS:
        if k < len(nominal) and len(nominal) % k == 0:
            out[k] = StepSchedule.from_config(pipe.scheduler, nominal[::len(nominal) // k], first,
                                              cfg.warp_denoising_step)
    return out


def settings_for(pipe: StreamingPipeline, cfg, max_frames: int | None = None) -> DemoSettings:
    """Settings for ``pipe`` built from ``cfg``; ``max_frames`` (latent) defaults to 10x the training length."""
    schedules = step_schedules(pipe, cfg)
    default = cfg.image_or_video_shape[1]
    window = pipe.window(None)[0]   # the cache window of a long (or endless) video
    decoder = pipe.frame_decoder
    stride = decoder.temporal_compression if decoder is not None else 4
    return DemoSettings(fps=int(cfg.fps), height=int(cfg.height), width=int(cfg.width),
                        frames_per_block=cfg.num_frame_per_block, independent_first_frame=cfg.independent_first_frame,
                        default_frames=default, max_frames=max_frames or 10 * default, schedules=schedules,
                        default_steps=len(pipe.schedule.timesteps) if cfg.denoising_step_list is None
                        else len([s for s in cfg.denoising_step_list if s != 0]),
                        window=window, temporal_compression=stride, multistep=cfg.denoising_step_list is None)


# ---------------------------------------------------------------------------------------------------------------------
# Request checks (every value from the client is checked here before anything runs)

@dataclass
class StartRequest:
    prompt: str
    seed: int
    steps: int
    frames: int            # latent frames (ignored when endless)
    endless: bool = False  # until the client presses Stop (or leaves)


def _int(msg: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = msg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):  # JSON true is an int in Python; refuse it
        raise RequestError(f"{key} must be a whole number, got {value!r}"[:200])
    if not low <= value <= high:
        raise RequestError(f"{key} must be between {low} and {high}, got {value}")
    return value


def check_prompt(value: Any, settings: DemoSettings) -> str:
    if not isinstance(value, str):
        raise RequestError("prompt must be text")
    prompt = value.strip()
    if not prompt:
        raise RequestError("prompt is empty")
    if len(prompt) > settings.max_prompt_chars:
        raise RequestError(f"prompt is {len(prompt)} characters long; the limit is {settings.max_prompt_chars}")
    return prompt


def check_start(msg: dict, settings: DemoSettings, block_sizes: Callable[[int], list]) -> StartRequest:
    """A ``start`` message -> a :class:`StartRequest`, or :class:`RequestError` with a one-line reason."""
    prompt = check_prompt(msg.get("prompt"), settings)
    seed = _int(msg, "seed", 0, settings.max_seed, 0)
    steps = _int(msg, "steps", 1, 1000, settings.default_steps)
    if steps not in settings.schedules:
        raise RequestError(f"steps must be one of {sorted(settings.schedules)} for this model, got {steps}")
    endless = msg.get("endless", False)
    if not isinstance(endless, bool):
        raise RequestError(f"endless must be true or false, got {endless!r}"[:200])
    if endless:
        return StartRequest(prompt, seed, steps, settings.default_frames, endless=True)
    frames = _int(msg, "frames", 1, settings.max_frames, settings.default_frames)
    try:
        block_sizes(frames)
    except ValueError as e:
        raise RequestError(f"frames: {e}") from None
    return StartRequest(prompt, seed, steps, frames)


# ---------------------------------------------------------------------------------------------------------------------
# Finished videos (served by token; the client never names a path or a file)

class VideoStore:
    """mp4 files of finished videos in a private temporary folder, the newest ``keep`` of them."""

    def __init__(self, keep: int = 16):
        self.folder = tempfile.mkdtemp(prefix="causal-forcing-demo-")
        atexit.register(self.cleanup)  # also when the server ends without its shutdown hook
        self.keep = keep
        self._files: OrderedDict[str, tuple[str, str]] = OrderedDict()   # token -> (path, download name)
        self._lock = threading.Lock()

    def new_path(self) -> tuple[str, str]:
        token = secrets.token_urlsafe(16)
        return token, os.path.join(self.folder, token + ".mp4")

    def add(self, token: str, path: str, prompt: str) -> None:
        with self._lock:
            self._files[token] = (path, safe_output_name(prompt) + ".mp4")  # named as inference.py names it
            while len(self._files) > self.keep:
                _, (old, _) = self._files.popitem(last=False)
                if os.path.exists(old):
                    os.remove(old)

    def get(self, token: str) -> tuple[str, str] | None:
        with self._lock:
            return self._files.get(token)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# The worker

def encode_jpeg(frame, quality: int) -> bytes:
    """uint8 ``[H, W, 3]`` -> JPEG bytes (Pillow releases the GIL while encoding)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_GPU_WORKER: ThreadPoolExecutor | None = None
_GPU_WORKER_LOCK = threading.Lock()


def gpu_worker() -> ThreadPoolExecutor:
    """The one thread every generation of this process runs on. PyTorch keeps cuDNN's tuned convolution plans in a
    thread-local cache, so a fresh thread per video re-tuned every VAE convolution during that video: on the H100
    the same pipeline made 16-19 FPS chunk-wise with a 0.8-1.2 s first frame on a new thread, 29 FPS and 0.2 s on
    one that stays (docs/performance.md)."""
    global _GPU_WORKER
    with _GPU_WORKER_LOCK:
        if _GPU_WORKER is None:
            _GPU_WORKER = ThreadPoolExecutor(1, thread_name_prefix="demo-generation")
        return _GPU_WORKER


class Generation:
    """One video on the GPU worker thread (:func:`gpu_worker`). ``emit(kind, payload)`` is called (from worker
    threads, in order) with ``("json", dict)``, ``("frame", (index, jpeg bytes))`` and finally ``("end", None)``."""

    def __init__(self, pipe: StreamingPipeline, request: StartRequest, settings: DemoSettings,
                 store: VideoStore, emit: Callable[[str, Any], None]):
        self.pipe = dataclasses.replace(pipe, schedule=settings.schedules[request.steps])  # shares the networks
        self.request, self.settings, self.store, self.emit = request, settings, store, emit
        self._pending: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.keep_video = True
        self.stream_ref: weakref.ref | None = None    # dead once the stream (and its caches) is freed
        self.cache = None                             # the stream's KV cache object (emptied at the end)
        self.frames_done = 0
        self._muxed: list = []                        # futures of the mp4 appends not finished yet
        self._sent: list = []                         # futures of the JPEG encodings not finished yet
        self._mux_error: BaseException | None = None  # the first failed mp4 append
        self._done: Future | None = None

    def start(self) -> None:
        self._done = gpu_worker().submit(self._run)

    @property
    def finished(self) -> bool:
        """The generation has ended (its caches are freed) or never started."""
        return self._done is None or self._done.done()

    def switch(self, prompt: str) -> None:
        """Use ``prompt`` from the next block that starts after this call."""
        with self._lock:
            self._pending = prompt

    def stop(self, keep_video: bool = True) -> None:
        """Stop after the block being generated; ``keep_video=False`` (client gone) discards the mp4."""
        self.keep_video = self.keep_video and keep_video
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def join(self, timeout: float | None = None) -> None:
        if self._done is not None:   # None: never started (the client left first), nothing to wait for
            futures_wait([self._done], timeout)

    def _take_switch(self) -> str | None:
        with self._lock:
            prompt, self._pending = self._pending, None
        return prompt

    def _run(self) -> None:
        token, path = self.store.new_path()
        writer = Mp4StreamWriter(path, fps=self.settings.fps)
        encoder, muxer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        stats = dict(start=time.perf_counter(), first=None, error=None)
        try:
            self._generate(writer, encoder, muxer, stats)
        except Exception as e:  # reported to the client; the server keeps serving
            log.exception("generation failed")
            stats["error"] = str(e) if isinstance(e, UserError) else f"generation failed: {type(e).__name__}: {e}"
            self.keep_video = False
        finally:
            encoder.shutdown(wait=True)
            muxer.shutdown(wait=True)
            self._finish(writer, token, path, stats)

    def _generate(self, writer, encoder, muxer, stats) -> None:
        req = self.request
        stream = self.pipe.open(req.prompt, num_latent_frames=req.frames, seed=req.seed, uint8=True,
                                endless=req.endless)
        self.stream_ref, self.cache = weakref.ref(stream), stream.cache
        blocks = iter(stream)
        try:
            while True:
                new_prompt = self._take_switch()
                if self._stop.is_set():
                    break
                if new_prompt is not None:
                    stream.switch_prompt(new_prompt)
                chunk = next(blocks, None)
                if chunk is None:
                    break
                frames = chunk.frames[0].numpy()   # [T, H, W, 3] uint8, converted beside the decode
                now = time.perf_counter()
                stats["first"] = stats["first"] or now - stats["start"]
                first, self.frames_done = self.frames_done, self.frames_done + len(frames)
                elapsed = now - stats["start"]
                meta = dict(type="block", index=chunk.block_index, first_frame=first, frames=len(frames),
                            switched=chunk.switched, prompt=chunk.prompt[0], frames_generated=self.frames_done,
                            elapsed=elapsed, gen_fps=self.frames_done / elapsed, first_frame_s=stats["first"])
                self._sent.append(encoder.submit(self._send_block, meta, frames))
                self._muxed.append(muxer.submit(writer.append, frames))
                self._settle()
        finally:
            blocks.close()      # a suspended generator frame would keep the stream (and its caches) alive
            stream.close()      # KV cache freed now
            stats["seconds"] = time.perf_counter() - stats["start"]
            del stream, blocks

    def _settle(self) -> None:
        """Forget finished JPEG and mp4 work (keeping the first mp4 failure), and wait while more than
        ``MAX_QUEUED_BLOCKS`` blocks are queued for either: an endless video must not pile up frames in memory when
        the encoder or the writer falls behind."""
        for queue in (self._sent, self._muxed):
            if len(queue) > MAX_QUEUED_BLOCKS:
                futures_wait(queue[:len(queue) - MAX_QUEUED_BLOCKS])
        for f in self._muxed:
            if f.done() and self._mux_error is None:
                self._mux_error = f.exception()
        self._sent = [f for f in self._sent if not f.done()]
        self._muxed = [f for f in self._muxed if not f.done()]

    def _send_block(self, meta: dict, frames) -> None:
        self.emit("json", meta)
        for i, frame in enumerate(frames):
            self.emit("frame", (meta["first_frame"] + i, encode_jpeg(frame, self.settings.jpeg_quality)))

    def _finish(self, writer: Mp4StreamWriter, token: str, path: str, stats: dict) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()   # give the freed cache back so the next generation (or nvidia-smi) sees it
        download = None
        failed = self._mux_error or next((f.exception() for f in self._muxed if f.exception() is not None), None)
        if self.keep_video and writer.num_frames and failed is None:
            try:
                writer.close()
                self.store.add(token, path, self.request.prompt)
                download = f"video/{token}"
            except Exception as e:
                log.exception("writing the mp4 failed")
                stats["error"] = stats["error"] or f"writing the mp4 failed: {e}"
        else:
            writer.abort()
            if failed is not None:
                stats["error"] = stats["error"] or f"writing the mp4 failed: {failed}"
        seconds = stats.get("seconds") or time.perf_counter() - stats["start"]
        if stats["error"]:
            self.emit("json", dict(type="error", message=stats["error"]))
        self.emit("json", dict(type="done", stopped=self.stopped, frames=self.frames_done, download=download,
                               seconds=seconds, gen_fps=self.frames_done / seconds if seconds else 0.0,
                               first_frame_s=stats["first"]))
        self.emit("end", None)
