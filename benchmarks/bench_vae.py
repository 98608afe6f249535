"""Streaming VAE decode alone: the full Wan2.1 VAE (random weights), 21 latent frames of 60x104 -> 81 frames of
480x832, decoded chunk by chunk as the streaming pipeline does (one latent frame first, then ``frames_per_call``).

For each variant (eager / compiled decoder step, frames per call, channels-last) it reports, median of ``--runs``
after a warm-up (the warm-up includes any compile): seconds for the 81 frames, time of the first call (one pixel
frame) and of a steady call, peak GPU memory. Prints a table and writes JSON (device and versions included).

    python benchmarks/bench_vae.py --out bench_vae.json --variants eager compiled compiled_fpc4
    python benchmarks/bench_vae.py --tiny --out /tmp/bench_vae.json   # CPU smoke test on a tiny VAE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_results, set_conv_padding  # noqa: E402
from model.preview_decoder import TinyVideoDecoder  # noqa: E402
from model.vae import WAN21_VAE_CONFIG, WanVAE  # noqa: E402

VARIANTS = {
    "eager": dict(compile=False, frames_per_call=1, channels_last=True),
    "eager_fpc4": dict(compile=False, frames_per_call=4, channels_last=True),
    "compiled": dict(compile=True, frames_per_call=1, channels_last=True),
    "compiled_no_pad": dict(compile=True, frames_per_call=1, channels_last=True, conv_pad=False),  # before 11-26 pm
    "preview": dict(compile=False, frames_per_call=1, channels_last=True, preview=True),  # TAEHV-style decoder
    "compiled_fpc3": dict(compile=True, frames_per_call=3, channels_last=True),
    "compiled_fpc4": dict(compile=True, frames_per_call=4, channels_last=True),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_once(vae: WanVAE, latents: torch.Tensor, frames_per_call: int, block: int) -> dict:
    """Decode ``latents`` in blocks of ``block`` latent frames (the first block as the pipeline cuts it)."""
    stream = vae.stream(frames_per_call)
    sync()
    start = time.perf_counter()
    calls, frames = [], 0
    for i in range(0, latents.shape[1], block):
        t = time.perf_counter()
        frames += stream.decode_chunk(latents[:, i:i + block]).shape[1]
        sync()
        calls.append(time.perf_counter() - t)
    return dict(seconds=time.perf_counter() - start, first_block_s=calls[0],
                steady_block_s=statistics.median(calls[1:]), frames=frames)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=VARIANTS)
    p.add_argument("--runs", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--block", type=int, default=3, help="latent frames handed to the decoder per block (3: chunk-wise)")
    p.add_argument("--out", default="bench_vae.json", help="JSON output path")
    p.add_argument("--tiny", action="store_true", help="smoke test on the CPU with a tiny random VAE")
    args = p.parse_args(argv)
    if args.tiny:
        from toy.folders import TINY_VAE

        device, dtype, vae = torch.device("cpu"), torch.float32, WanVAE.from_config(**TINY_VAE)
        latents = torch.randn(1, 7, 16, 4, 6)
    elif not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cudnn.benchmark = True
        vae = WanVAE.from_config(**WAN21_VAE_CONFIG).to(device, dtype)
        latents = torch.randn(1, 21, 16, 60, 104, device=device, dtype=dtype)
    rows = []
    wan_vae = vae
    for name in args.variants:
        variant = VARIANTS[name]
        if variant.get("preview"):  # the optional preview decoder at its released size (random weights)
            vae = TinyVideoDecoder(**({} if not args.tiny else dict(widths=(8, 8, 8, 8)))).to(device, dtype)
            if device.type == "cuda":
                vae.to_channels_last()
        else:
            vae = wan_vae
            vae.set_channels_last(variant["channels_last"])
            set_conv_padding(variant.get("conv_pad", True))
            vae.compile_decoder(variant["compile"])
        t = time.perf_counter()
        run_once(vae, latents, variant["frames_per_call"], args.block)  # warm-up: compile, cuDNN plans
        warmup_s = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = [run_once(vae, latents, variant["frames_per_call"], args.block) for _ in range(args.runs)]
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row.update(variant=name, warmup_s=warmup_s,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0)
        rows.append(row)
        print(f"{name:22s} {row['seconds']:.3f} s for {row['frames']} frames ({row['frames'] / row['seconds']:.1f} "
              f"FPS) | first block {row['first_block_s'] * 1e3:.0f} ms | steady block "
              f"{row['steady_block_s'] * 1e3:.0f} ms | peak {row['peak_gib']:.1f} GiB | warm-up {warmup_s:.0f} s",
              flush=True)
    save_results(args.out, rows, device, block=args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
