"""The optional TAEHV-style preview decoder: file loading, streaming == one-shot == a frame-by-frame reference."""

import pytest
import torch

from model.preview_decoder import MemoryBlock, TimeGrow, TinyVideoDecoder
from pipeline.streaming import StreamingPipeline
from tests.conftest import write_tiny_stream_config
from utils.config import load_config
from utils.errors import CheckpointError, WeightsMissingError

TINY = dict(widths=(8, 8, 8, 8))


def random_decoder(seed: int = 0) -> TinyVideoDecoder:
    torch.manual_seed(seed)
    model = TinyVideoDecoder(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def write_file(model: TinyVideoDecoder, path) -> None:
    """As TAEHV files store it: encoder keys too, and the x1 time-grow layer at twice its width."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grow = state["decoder.7.conv.weight"]
    state["decoder.7.conv.weight"] = torch.cat([torch.randn_like(grow), grow])  # the last rows are the used ones
    state["encoder.0.weight"] = torch.randn(64, 3, 3, 3)
    torch.save(state, path)


@torch.no_grad()
def frame_by_frame(model: TinyVideoDecoder, z: torch.Tensor) -> torch.Tensor:
    """Independent reference: every frame walks the whole network depth-first (time-grow children in order), each
    memory block remembering the last input it saw; the first three frames are dropped."""
    layers, memory, frames = list(model.decoder), {}, []

    def run(x, start):
        for i in range(start, len(layers)):
            layer = layers[i]
            if isinstance(layer, MemoryBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, TimeGrow):
                children = layer(x)
                for k in range(children.shape[0]):
                    run(children[k:k + 1], i + 1)
                return
            else:
                x = layer(x)
        frames.append(x)

    for t in range(z.shape[1]):
        run(z[:, t], 0)
    return (torch.stack(frames, 1)[:, 3:].clamp(0, 1) * 2 - 1).float()


def test_load_stream_and_reference(tmp_path):
    model = random_decoder()
    path = tmp_path / "taew2_1.pth"
    write_file(model, path)
    loaded = TinyVideoDecoder.from_file(path, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    z = torch.randn(1, 6, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    one_shot = loaded.decode(z)
    assert one_shot.shape == (1, 1 + 4 * 5, 3, 16, 24) and loaded.num_pixel_frames(6) == 21
    assert one_shot.min() >= -1 and one_shot.max() <= 1
    torch.testing.assert_close(one_shot, frame_by_frame(loaded, z), rtol=0, atol=1e-5)
    stream = loaded.stream()
    pieces = [stream.decode_chunk(z[:, a:b]) for a, b in ((0, 1), (1, 3), (3, 6))]
    assert [p.shape[1] for p in pieces] == [1, 8, 12]
    torch.testing.assert_close(torch.cat(pieces, 1), one_shot, rtol=0, atol=1e-5)
    stream.reset()
    torch.testing.assert_close(stream.decode_chunk(z[:, :2]), one_shot[:, :5], rtol=0, atol=1e-5)


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(WeightsMissingError, match="preview decoder not found.*taehv"):
        TinyVideoDecoder.from_file(tmp_path / "nope.pth", **TINY)
    path = tmp_path / "other.pth"
    state = random_decoder().state_dict()
    state["decoder.99.weight"] = torch.zeros(1)
    del state["decoder.1.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"does not fit the preview decoder.*decoder\.1\.bias.*decoder\.99"):
        TinyVideoDecoder.from_file(path, **TINY)


def test_pipeline_streams_through_the_preview_decoder(tmp_path, monkeypatch):
    cfg = load_config(str(write_tiny_stream_config(tmp_path)))
    path = tmp_path / "taew2_1.pth"
    write_file(random_decoder(), path)
    monkeypatch.setattr("model.preview_decoder.TAEHV_WAN21", dict(latent_channels=16, **TINY))
    pipe = StreamingPipeline.from_config(cfg, device="cpu", preview_decoder=str(path))
    assert pipe.frame_decoder is pipe.preview_decoder and pipe.vae is not None  # the VAE stays for I2V encoding
    chunks = list(pipe.open("a red circle moving left slowly", num_latent_frames=6, seed=3))
    frames = torch.cat([c.frames for c in chunks], 1)
    latents = torch.cat([c.latents for c in chunks], 1)
    assert frames.shape == (1, 21, 3, 32, 48)
    torch.testing.assert_close(frames, pipe.preview_decoder.decode(latents), rtol=0, atol=1e-5)
