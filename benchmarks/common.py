"""What every inference benchmark writes next to its rows: the machine, the versions, the date, the command."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

# Run as ``python benchmarks/X.py``, a script finds the packages of whatever clone is installed (``pip install -e``):
# put the clone it belongs to first, so that it measures this checkout's code. Every benchmark imports this module
# before the project's packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def save_results(path: str, rows: list[dict], device: torch.device, **extra) -> dict:
    """Write ``{"info": ..., "rows": rows}`` as JSON to ``path``, print the info line and return it."""
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), **extra)
    Path(path).write_text(json.dumps(dict(info=info, rows=rows), indent=2))
    print(json.dumps(info))
    return info


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``|a - b| / |b|`` (Frobenius), in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cuda_ms(fn, iters: int = 20) -> float:
    """Mean time of ``iters`` back-to-back calls of ``fn`` after 3 warm-up calls, in ms (CUDA events)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def cuda_graph_ms(fn, iters: int = 20) -> float:
    """Mean time of ``iters`` replays of a CUDA graph holding one call of ``fn``, in ms (CUDA events): the GPU's time
    without the host's launch cost, as the pipeline's graphs run the call. Warmed up on a side stream first."""
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def streaming_setup(tiny: bool):
    """What the streaming benchmarks run on: ``(device, dtype, preset, latent_shape, vae, context)``.

    GPU: the full-size Wan2.1-1.3B preset at 480x832 (latents 16x60x104), the full Wan VAE, bf16, random ``[1, 512,
    4096]`` prompt embeddings; ``tiny``: the tiny presets on the CPU (smoke tests). None without a GPU and not tiny."""
    from model.config import get_preset
    from model.vae import WAN21_VAE_CONFIG, WanVAE
    from utils.config import Config

    if tiny:
        from toy.folders import TINY_DIT, TINY_VAE

        return (torch.device("cpu"), torch.float32, "tiny", (16, 4, 6), WanVAE.from_config(**TINY_VAE),
                torch.randn(1, TINY_DIT.text_len, TINY_DIT.text_dim))
    if not torch.cuda.is_available():
        return None
    device, dtype, preset = torch.device("cuda"), torch.bfloat16, "wan2.1-t2v-1.3b"
    torch.backends.cudnn.benchmark = True
    cfg = get_preset(preset)
    vae = WanVAE.from_config(**WAN21_VAE_CONFIG).to(device, dtype).to_channels_last()  # as from_config on CUDA
    video = Config(trainer="diffusion")   # the configs' default geometry: 480x832 pixels
    latent_shape = (vae.latent_channels, video.height // vae.spatial_compression,
                    video.width // vae.spatial_compression)
    return (device, dtype, preset, latent_shape, vae,
            torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype))
