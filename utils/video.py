"""MP4 writing/reading (imageio + its bundled ffmpeg, libx264, yuv420p) and safe output file names. Every writer is
atomic (:mod:`utils.io`): no partial ``.mp4`` ever sits under a final name."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import unicodedata

import numpy as np

from utils.errors import OutputError, free_space, one_line
from utils.io import AtomicPath, CloseOrAbort

logger = logging.getLogger(__name__)

DEFAULT_FPS = 16


def imageio_v2():
    """``imageio.v2``, imported lazily, with imageio-ffmpeg starting ffmpeg without ``preexec_fn=os.setpgrp``: that runs
    Python in the forked child, unsafe while other threads run (it segfaulted or hung CI). Set
    ``IMAGEIO_FFMPEG_NO_PREVENT_SIGINT=0`` to get it back."""
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    import imageio.v2 as imageio

    return imageio


def mp4_writer_missing() -> str | None:
    """Why no mp4 can be written here (one line with the fix), or None when imageio finds its ffmpeg."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        return f"no ffmpeg for imageio ({one_line(err)}): pip install imageio-ffmpeg"
    return None


def pixels_to_uint8(frames):
    """Pixels ``[..., 3, H, W]`` in [-1, 1] (a tensor) -> uint8 ``[..., H, W, 3]`` on their device, equal to
    :func:`to_uint8_frames` (a GPU then sends the host a quarter of the bytes)."""
    import torch

    unit = (torch.nan_to_num(frames.float()) + 1.0) / 2.0
    pixels = unit.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return pixels.movedim(-3, -1).contiguous()


def to_uint8_frames(frames, value_range: tuple[float, float] | None = None, layout: str = "THWC") -> np.ndarray:
    """Frames (uint8, or float in ``value_range``, e.g. ``(-1, 1)``: required, as it cannot be guessed from values)
    as a uint8 numpy array ``[T, H, W, 3]``; ``layout`` ``"THWC"`` or ``"TCHW"``. Out-of-range values are clipped;
    rounding is to nearest (the reference truncated)."""
    if hasattr(frames, "detach"):
        frames = frames.detach().to("cpu")
        frames = frames.float().numpy() if frames.dtype.is_floating_point else frames.numpy()
    frames = np.asarray(frames)
    if layout not in ("THWC", "TCHW"):
        raise ValueError(f"layout must be 'THWC' or 'TCHW', got {layout!r}")
    if frames.ndim != 4:
        raise ValueError(f"frames must be rank 4 ({layout}), got shape {frames.shape}")
    if layout == "TCHW":
        frames = frames.transpose(0, 2, 3, 1)
    if frames.shape[-1] != 3:
        raise ValueError(f"frames must have 3 colour channels ({layout}), got shape {frames.shape}")
    if frames.dtype == np.uint8:
        if value_range not in (None, (0, 255)):
            raise ValueError(f"uint8 frames are already 0..255; value_range={value_range} makes no sense")
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float, got {frames.dtype}")
    if value_range is None:
        raise ValueError("float frames need value_range=(0, 1) or (-1, 1)")
    low, high = value_range
    unit = (np.nan_to_num(frames.astype(np.float32)) - low) / (high - low)
    return np.ascontiguousarray(np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8))


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``[T, H, W, 3]`` to even H and W by replicating the last row/column (yuv420p needs even sizes)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


class Mp4StreamWriter(CloseOrAbort):
    """Append frames chunk by chunk (one frame size) to an mp4 that appears atomically at :meth:`close`; an exception
    in the ``with`` block, or :meth:`abort`, leaves no file (``value_range``, ``layout``: :func:`to_uint8_frames`)."""

    def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, value_range=None, layout: str = "THWC"):
        self.path = os.fspath(path)
        self.fps, self.value_range, self.layout = fps, value_range, layout
        self.num_frames = 0
        self._size: tuple[int, int] | None = None
        self._writer = None
        self._target: AtomicPath | None = None   # the temporary file ffmpeg writes, once frames arrive
        self._closed = False

    def append(self, frames) -> None:
        """Append ``[T, H, W, 3]`` frames (or ``[T, 3, H, W]`` with ``layout="TCHW"``)."""
        if self._closed:
            raise RuntimeError(f"writer for {self.path} is already closed")
        frames = pad_to_even(to_uint8_frames(frames, self.value_range, self.layout))
        if self._writer is None:
            imageio = imageio_v2()
            # ffmpeg picks the container from the temporary name's extension (the final name's). Its own error lines
            # are silenced: close() checks what it wrote and reports a failure in one line. quality=None: libx264's
            # own default (CRF 23), not imageio's quality 5.
            self._target = AtomicPath(self.path)
            self._size = frames.shape[1:3]
            self._writer = imageio.get_writer(
                str(self._target.tmp), format="FFMPEG", mode="I", fps=self.fps, codec="libx264", pixelformat="yuv420p",
                quality=None, macro_block_size=1, ffmpeg_log_level="fatal")
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size {frames.shape[1:3]} differs from the first frames' {self._size}")
        try:
            for frame in frames:
                self._writer.append_data(frame)
        except OSError as err:   # ffmpeg exited (e.g. a full disk); imageio's message pastes its whole command line
            self.abort()
            raise OutputError(f"{self.path}: ffmpeg stopped while writing ({one_line(err)}); nothing was saved") \
                from None
        self.num_frames += len(frames)

    def close(self) -> None:
        """Finish encoding and move the file to its final path."""
        if self._closed:
            return
        if self.num_frames == 0:
            self.abort()
            raise ValueError(f"no frames were written for {self.path}")
        try:
            self._writer.close()
            self._writer = None
            found = count_mp4_frames(self._target.tmp)
        except BaseException:
            self.abort()
            raise
        if found != self.num_frames:   # ffmpeg's exit status is not checked by imageio: a full disk truncates silently
            self.abort()
            got = "an unreadable file" if found is None else f"{found} of them"
            raise OutputError(f"{self.path}: ffmpeg was given {self.num_frames} frames but wrote {got}"
                              f"{free_space(self.path)}; nothing was saved")
        self._target.commit()
        self._target = None
        self._closed = True

    def abort(self) -> None:
        """Stop and delete the temporary file; the final path is left untouched."""
        self._closed = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the file is discarded anyway; the original error matters more
                logger.debug("closing ffmpeg after an error failed", exc_info=True)
            self._writer = None
        if self._target is not None:
            self._target.discard()
            self._target = None


def write_mp4(path: str | os.PathLike, frames, fps: float = DEFAULT_FPS, value_range=None, layout: str = "THWC"):
    """Write ``frames`` (uint8 ``[T, H, W, 3]``, or float with ``value_range``) to ``path`` atomically."""
    with Mp4StreamWriter(path, fps=fps, value_range=value_range, layout=layout) as writer:
        writer.append(frames)


def count_mp4_frames(path: str | os.PathLike) -> int | None:
    """Frames of an mp4 as its container indexes them (a stream copy: tens of milliseconds), or None when ffmpeg
    cannot read the file (e.g. cut short before its index)."""
    import imageio_ffmpeg  # imageio's ffmpeg binary

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", os.fspath(path), "-map", "0:v:0",
           "-c", "copy", "-f", "null", "-"]
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    counts = re.findall(r"frame=\s*(\d+)", run.stderr)
    return int(counts[-1]) if run.returncode == 0 and counts else None


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video as uint8 ``[T, H, W, 3]`` (for tests and tools)."""
    with imageio_v2().get_reader(os.fspath(path), format="FFMPEG") as reader:
        frames = [np.asarray(frame) for frame in reader]
    return np.stack(frames)


_RESERVED_CHARS = set('<>:"/\\|?*')  # path separators plus the characters Windows forbids in names
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_MAX_NAME_BYTES = 200  # filesystems cap names at 255 bytes; leave room for suffixes and the extension


def _cut(name: str, max_chars: int) -> str:
    name = name[:max(max_chars, 0)]
    while len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        name = name[:-1]
    # Leading dots would hide the file (or make ".."), a leading "-" reads as an option on command lines;
    # Windows drops trailing dots and spaces.
    return name.lstrip(" .-").rstrip(" .")


def safe_output_name(prompt: str, used: set | None = None, max_len: int = 100) -> str:
    """A file-name stem for ``prompt``, safe on Linux, macOS and Windows and the same on every run (a plain prompt
    gives ``prompt[:max_len]``, as in the reference): NFKC-normalised; ``/ \\ < > : " | ? *`` become ``_``, control,
    format and separator characters a space; cut to ``max_len`` characters and 200 UTF-8 bytes; empty becomes
    ``"prompt"``, a Windows device name gets a leading ``_``. With ``used`` (casefolded stems taken, updated) a clash
    gets ``_1``, ``_2``, ... within ``max_len``."""
    base = "".join("_" if ch in _RESERVED_CHARS else " " if unicodedata.category(ch)[0] in "CZ" else ch
                   for ch in unicodedata.normalize("NFKC", prompt or ""))

    def build(suffix: str) -> str:
        stem = _cut(base, max_len - len(suffix)) or "prompt"
        if stem.split(".")[0].strip().upper() in _WINDOWS_DEVICES:
            stem = "_" + stem
        return stem + suffix

    name, count = build(""), 0
    if used is not None:
        while name.casefold() in used:
            count += 1
            name = build(f"_{count}")
        used.add(name.casefold())
    return name
