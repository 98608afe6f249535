"""Streaming VAE decode alone: the full Wan2.1 VAE (random weights), 21 latent frames of 60x104 -> 81 frames of
480x832, decoded chunk by chunk as the streaming pipeline does (one latent frame per decoder call).

For each variant (eager or compiled decoder regions, with or without the padded 96-channel convolutions, or the
preview decoder) it reports, median of ``--runs`` after a warm-up (the warm-up includes any compile): seconds for
the 81 frames, time of the first block and of a steady block, peak GPU memory. Prints a table and writes JSON
(device and versions included).

    python benchmarks/bench_vae.py --out bench_vae.json --variants eager compiled
    python benchmarks/bench_vae.py --tiny --out /tmp/bench_vae.json   # CPU smoke test on a tiny VAE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import save_results

from model.preview_decoder import TinyVideoDecoder
from model.vae import WAN21_VAE_CONFIG, WanVAE

VARIANTS = {
    "eager": dict(compile=False),                          # --no_compile
    "compiled": dict(compile=True),                        # the fast path's decoder
    "preview": dict(compile=False, preview=True),          # --preview_decoder (TAEHV-style, released size)
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_once(vae: WanVAE, latents: torch.Tensor, block: int) -> dict:
    """Decode ``latents`` in blocks of ``block`` latent frames (the first block as the pipeline cuts it)."""
    stream = vae.stream(frames_per_call=1)
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


def preview_decoder(tiny: bool, device: torch.device, dtype: torch.dtype) -> TinyVideoDecoder:
    """The optional preview decoder at its released size (random weights; narrow with ``tiny``)."""
    decoder = TinyVideoDecoder(**(dict(widths=(8, 8, 8, 8)) if tiny else {})).to(device, dtype)
    return decoder.to_channels_last() if device.type == "cuda" else decoder


def measure(decoder, latents: torch.Tensor, block: int, runs: int, device: torch.device) -> dict:
    """Medians of ``runs`` streaming decodes after a warm-up (compile, cuDNN plans), with the peak memory."""
    t = time.perf_counter()
    run_once(decoder, latents, block)
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = [run_once(decoder, latents, block) for _ in range(runs)]
    row = {k: statistics.median(r[k] for r in results) for k in results[0]}
    row.update(warmup_s=warmup_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=VARIANTS,
                   help="decoders to time (the VARIANTS table of this script)")
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
        torch.backends.cudnn.benchmark_limit = 0   # as the pipeline's fast path sets it
        vae = WanVAE.from_config(**WAN21_VAE_CONFIG).to(device, dtype).to_channels_last()  # as the pipeline's
        latents = torch.randn(1, 21, 16, 60, 104, device=device, dtype=dtype)
    rows = []
    for name in args.variants:
        variant = VARIANTS[name]
        decoder = preview_decoder(args.tiny, device, dtype) if variant.get("preview") else \
            vae.compile_decoder(variant["compile"])
        row = dict(variant=name, **measure(decoder, latents, args.block, args.runs, device))
        rows.append(row)
        print(f"{name:22s} {row['seconds']:.3f} s for {row['frames']} frames ({row['frames'] / row['seconds']:.1f} "
              f"FPS) | first block {row['first_block_s'] * 1e3:.0f} ms | steady block "
              f"{row['steady_block_s'] * 1e3:.0f} ms | peak {row['peak_gib']:.1f} GiB | warm-up "
              f"{row['warmup_s']:.0f} s", flush=True)
    save_results(args.out, rows, device, block=args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
