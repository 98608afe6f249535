"""mp4 writing/reading and safe output names."""

import os
import unicodedata

import numpy as np
import pytest
import torch

from tests.conftest import fill_disk
from utils.errors import OutputError
from utils.video import (
    Mp4StreamWriter,
    count_mp4_frames,
    pixels_to_uint8,
    read_mp4,
    safe_output_name,
    to_uint8_frames,
    write_mp4,
)


def gradient_frames(t=9, h=32, w=48) -> np.ndarray:
    """Smooth content (codec-friendly) so decoded pixels stay close to the input."""
    y, x = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([(x * 5 + k * 8) % 256, (y * 7) % 256, np.full_like(x, 128)], -1)
                       for k in range(t)])
    return frames.astype(np.uint8)


def test_write_read_round_trip(tmp_path):
    frames = gradient_frames()
    write_mp4(tmp_path / "out" / "v.mp4", frames, fps=16)  # parent folder is created
    back = read_mp4(tmp_path / "out" / "v.mp4")
    assert back.shape == frames.shape and back.dtype == np.uint8
    # Lossy codec: compare the mean error (tolerance 6 grey levels for smooth content at CRF 23).
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6
    assert os.listdir(tmp_path / "out") == ["v.mp4"]  # no temporary file left


def test_float_input_odd_size_and_channels_first(tmp_path):
    video = torch.rand(4, 3, 15, 21) * 2 - 1  # [T, C, H, W] in [-1, 1], odd H and W
    write_mp4(tmp_path / "f.mp4", video, value_range=(-1, 1), layout="TCHW")
    assert read_mp4(tmp_path / "f.mp4").shape == (4, 16, 22, 3)  # padded to even (yuv420p)
    with pytest.raises(ValueError, match="value_range"):
        write_mp4(tmp_path / "g.mp4", video.permute(0, 2, 3, 1))
    assert not (tmp_path / "g.mp4").exists()


def test_to_uint8_frames_mapping():
    x = np.array([-1.0, -0.5, 0.0, 1.0, 2.0, np.nan], dtype=np.float32)
    frames = np.broadcast_to(x[None, None, :, None], (1, 1, 6, 3))
    out = to_uint8_frames(frames, value_range=(-1, 1))[0, 0, :, 0]
    assert out.tolist() == [0, 64, 128, 255, 255, 128]  # rounds (0.25*255=63.75 -> 64), clips, NaN -> 0 -> mid
    assert to_uint8_frames(np.full((1, 2, 2, 3), 0.5), value_range=(0, 1))[0, 0, 0, 0] == 128


def test_stream_writer_appends_chunks(tmp_path):
    frames = gradient_frames(t=10)
    with Mp4StreamWriter(tmp_path / "s.mp4", fps=16) as writer:
        writer.append(frames[:3])
        writer.append(frames[3:])
        assert not (tmp_path / "s.mp4").exists()  # appears only at close
    assert read_mp4(tmp_path / "s.mp4").shape[0] == 10


def test_stream_writer_leaves_no_partial_file_on_error(tmp_path):
    write_mp4(tmp_path / "keep.mp4", gradient_frames(t=2))
    with pytest.raises(RuntimeError, match="boom"), Mp4StreamWriter(tmp_path / "s.mp4") as writer:
        writer.append(gradient_frames(t=3))
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="differs"), Mp4StreamWriter(tmp_path / "keep.mp4") as writer:
        writer.append(gradient_frames(t=3))
        writer.append(gradient_frames(t=3, h=16))
    assert sorted(os.listdir(tmp_path)) == ["keep.mp4"]  # no partial, no temp; the old file is untouched
    assert read_mp4(tmp_path / "keep.mp4").shape[0] == 2


NASTY = [
    # (prompt, expected stem)
    ("a cat playing piano", "a cat playing piano"),
    ("../../etc/passwd", "_.._etc_passwd"),
    ("a/b", "a_b"),
    ("back\\slash", "back_slash"),
    ('say "hi" it\'s <ok>?', "say _hi_ it's _ok__"),
    ("nul\x00byte\ncontrol\tchars\x7f", "nul byte control chars"),
    ("...hidden", "hidden"),
    (" -rf and trailing dots. . ", "rf and trailing dots"),
    ("CON", "_CON"),
    ("nul.txt", "_nul.txt"),
    ("Ａ／Ｂ ｆｕｌｌ", "A_B full"),  # NFKC folds full-width forms before filtering
    ("e\u0301", "\u00e9"),  # NFKC composes
    ("🐱 emoji 🎹", "🐱 emoji 🎹"),
    ("", "prompt"),
    ("   ", "prompt"),
    ("///", "___"),
    ("..", "prompt"),
    ("\u202eevil", "evil"),  # bidi override removed
]


def noise_frames(t=40, h=64, w=96) -> np.ndarray:
    """Incompressible frames: ~130 KiB of mp4, more than the 64 KiB left on the test disk."""
    return np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_full_disk_saves_no_video(tiny_disk):
    """On a full filesystem ffmpeg cannot write the mp4's index; imageio does not check its exit status, so the
    writer counts the frames in what was written: one line, no final file, no temporary file, and the old video
    under that name (if any) is kept."""
    write_mp4(tiny_disk / "kept.mp4", gradient_frames(t=2))
    before = (tiny_disk / "kept.mp4").read_bytes()
    fill_disk(tiny_disk, leave=64 * 1024)
    with pytest.raises(OutputError, match=r"kept\.mp4: ffmpeg was given 40 frames but wrote .*nothing was saved") \
            as err:
        write_mp4(tiny_disk / "kept.mp4", noise_frames())
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tiny_disk)) == ["filler", "kept.mp4"] and (tiny_disk / "kept.mp4").read_bytes() == before


def test_truncated_mp4_is_not_renamed(tmp_path, monkeypatch):
    """The same check without a small disk: ffmpeg's output is cut short after it exits (as when its last write
    fails), so its index is gone or points past the end."""
    import imageio.v2 as imageio

    real_get_writer = imageio.get_writer

    def cut_short(path, *args, **kwargs):
        writer = real_get_writer(path, *args, **kwargs)
        real_close = writer.close

        def close():
            real_close()
            os.truncate(path, os.path.getsize(path) // 2)
        writer.close = close
        return writer

    monkeypatch.setattr(imageio, "get_writer", cut_short)
    with pytest.raises(OutputError, match="ffmpeg was given 9 frames but wrote"):
        write_mp4(tmp_path / "v.mp4", gradient_frames())
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    write_mp4(tmp_path / "v.mp4", gradient_frames())
    assert count_mp4_frames(tmp_path / "v.mp4") == 9 and os.listdir(tmp_path) == ["v.mp4"]



@pytest.mark.parametrize("prompt,expected", NASTY)
def test_safe_output_name_table(prompt, expected):
    assert safe_output_name(prompt) == expected


def test_safe_output_name_length_limits():
    long = "x" * 300
    assert safe_output_name(long) == "x" * 100
    assert safe_output_name(long, max_len=20) == "x" * 20
    emoji = safe_output_name("🐱" * 300)
    assert len(emoji.encode("utf-8")) <= 200 and set(emoji) == {"🐱"}  # filesystems allow 255 bytes, not chars
    assert safe_output_name("a" * 99 + " b") == "a" * 99  # trailing space after the cut is stripped


def test_safe_output_name_dedup():
    used: set = set()
    names = [safe_output_name(p, used=used) for p in ["A cat", "a cat", "A CAT", "a cat_1", "x" * 300, "x" * 301]]
    assert names == ["A cat", "a cat_1", "A CAT_2", "a cat_1_1", "x" * 100, "x" * 98 + "_1"]
    assert len({n.casefold() for n in names}) == len(names)
    for name in names:
        assert "/" not in name and name == unicodedata.normalize("NFKC", name)


def test_pixels_to_uint8_equals_to_uint8_frames():
    """The torch conversion (run on the GPU beside the decode) gives exactly the numpy one's values."""
    x = torch.randn(2, 3, 3, 5, 7) * 1.2                                    # [B, T, 3, H, W]
    x[0, 0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5 / 127.5 - 1])  # edge values
    out = pixels_to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 5, 7, 3)
    for b in range(2):
        np.testing.assert_array_equal(out[b].numpy(), to_uint8_frames(x[b], (-1, 1), "TCHW"))   # exact


def test_ffmpeg_starts_without_a_preexec_fn(monkeypatch):
    """imageio-ffmpeg's default preexec_fn runs Python between fork and exec, unsafe beside other threads (it
    segfaulted CI's decode threads); every mp4 reader/writer of ours must start ffmpeg without one."""
    from imageio_ffmpeg import _utils

    from utils.video import imageio_v2

    monkeypatch.delenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", raising=False)
    assert _utils._popen_kwargs(prevent_sigint=True)["preexec_fn"] is not None   # the library's default
    imageio_v2()
    assert _utils._popen_kwargs(prevent_sigint=True)["preexec_fn"] is None
