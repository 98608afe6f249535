"""Endless streaming: host memory, GPU memory and speed of one stream that never ends, over time.

The demo's "until stopped" and ``StreamingPipeline.open(endless=True)`` promise constant memory and constant
per-block time however long a stream runs (docs/architecture.md, "Endless streams"). This runs one endless stream,
switching the prompt every ``--switch_every`` latent frames, hands every block out as uint8 frames on the host (as the
demo does, then drops them) and records, per interval: host RSS, GPU memory allocated / reserved / peak, the frames
and FPS of that interval, the cache's position origin (it moves at each re-base past the RoPE table) and the latents
the stream keeps. Prints one line per interval and writes JSON (rewritten after every interval, so a run cut short
keeps what it measured).

    # the full-size Wan2.1-1.3B generator (random weights: speed does not depend on them) and Wan VAE, on a GPU:
    python benchmarks/bench_endless.py --model full --minutes 10 --out endless_gpu.json [--rolling]
    # the shipped toy model (configs/toy, assets/toy) on the CPU, to 5,000 latent frames:
    python benchmarks/bench_endless.py --model toy --frames 5000 --device cpu --out endless_toy.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from common import save_results, streaming_setup

from model.loader import build_wan_model
from model.masks import BlockLayout
from model.scheduler import FlowMatchScheduler
from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline

TOY_CONFIGS = {False: "configs/toy/causal_forcing_dmd_chunkwise.yaml",
               True: "configs/toy/rolling_forcing_dmd_framewise.yaml"}
ROOT = Path(__file__).resolve().parents[1]


def host_rss_mib() -> float:
    """Resident set size of this process (Linux ``/proc``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def full_pipeline(tiny: bool, rolling: bool) -> tuple[StreamingPipeline, list[torch.Tensor]]:
    """The 1.3B chunk-wise 4-step pipeline as inference.py builds it on CUDA (``tiny``: tiny random models, CPU),
    and two random prompt embeddings to switch between."""
    setup = streaming_setup(tiny)
    if setup is None:
        raise SystemExit("--model full needs a CUDA GPU (or --tiny for a CPU smoke test)")
    device, dtype, preset, latent_shape, vae, ctx = setup
    gen = build_wan_model(preset, causal=True, dtype=dtype, device=device).eval()
    gen.layout = BlockLayout(3, False)
    sch = FlowMatchScheduler(shift=5.0)
    schedule = StepSchedule.from_config(sch, [1000, 750, 500, 250])
    # as from_config: the window of a long video is the training length with one block of sink frames
    pipe = StreamingPipeline(gen, None, vae, sch, schedule, latent_shape=latent_shape, default_num_frames=21,
                             sink_size=3 if rolling else 0, rolling_span=21 if rolling else 0, device=device,
                             dtype=dtype)
    pipe.enable_fast_path()
    return pipe, [ctx, torch.randn_like(ctx)]


def toy_pipeline(device: str, rolling: bool) -> tuple[StreamingPipeline, list[str]]:
    import os

    from utils.config import load_config

    os.chdir(ROOT)   # the toy configs name assets/toy/... relative to the repository
    pipe = StreamingPipeline.from_config(load_config(ROOT / TOY_CONFIGS[rolling]), device=device)
    prompts = [line.strip() for line in (ROOT / "prompts" / "toy.txt").read_text().splitlines() if line.strip()]
    return pipe, prompts


def stream(pipe: StreamingPipeline, prompts: list, frames: int | None, minutes: float | None, interval_frames: int,
           interval_s: float, switch_every: int, record) -> None:
    """Run one endless stream until ``frames`` latent frames or ``minutes`` have passed; ``record(row)`` per
    interval (by frames, or by seconds when ``minutes`` is given)."""
    def prompt(p) -> dict:   # a text, or precomputed embeddings (the full-size run has no text encoder)
        return dict(prompt=p) if isinstance(p, str) else dict(prompt="benchmark", context=p)

    s = pipe.open(**prompt(prompts[0]), seed=0, uint8=True, endless=True)
    start = mark = time.perf_counter()
    done = mark_frames = pixel = mark_pixel = 0
    next_switch, switches = switch_every, itertools.cycle(prompts[1:] + prompts[:1])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for chunk in s:
        host = chunk.frames                      # uint8 [B, T, H, W, 3] on the host: what the demo encodes
        pixel += host.shape[1]
        done = chunk.start_frame + chunk.latents.shape[1]
        if done >= next_switch:                  # the next prompt applies from the next block
            s.switch_prompt(**prompt(next(switches)))
            next_switch += switch_every
        now = time.perf_counter()
        stop = (frames and done >= frames) or (minutes and now - start >= 60 * minutes)
        if stop or ((now - mark >= interval_s) if minutes else (done - mark_frames >= interval_frames)):
            record(dict(seconds=round(now - start, 2), latent_frames=done, pixel_frames=pixel,
                        fps=(pixel - mark_pixel) / (now - mark), latent_fps=(done - mark_frames) / (now - mark),
                        host_rss_mib=round(host_rss_mib(), 1), held_latent_frames=sum(x.shape[1] for _, x in s.held),
                        cache_mib=round(s.cache.nbytes / 2**20, 1), position_origin=s.cache.origin, **gpu_memory()))
            mark, mark_frames, mark_pixel = now, done, pixel
        if stop:
            break
    s.close()


def gpu_memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    out = dict(gpu_allocated_mib=torch.cuda.memory_allocated() / 2**20,
               gpu_reserved_mib=torch.cuda.memory_reserved() / 2**20,
               gpu_peak_mib=torch.cuda.max_memory_allocated() / 2**20)
    return {k: round(v, 1) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["full", "toy"], default="full",
                   help="full: the 1.3B generator with random weights on a GPU; toy: the shipped toy model")
    p.add_argument("--rolling", action="store_true", help="Rolling Forcing windows instead of block by block")
    p.add_argument("--minutes", type=float, default=None, help="stream this long (rows per minute)")
    p.add_argument("--frames", type=int, default=None, help="or stream this many latent frames")
    p.add_argument("--interval", type=int, default=500, help="latent frames per row with --frames")
    p.add_argument("--switch_every", type=int, default=96, help="latent frames between prompt switches")
    p.add_argument("--device", default=None, help="toy model: cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default="bench_endless.json", help="JSON output path")
    p.add_argument("--tiny", action="store_true", help="smoke test on the CPU with tiny random models, 24 frames")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.frames, args.interval, args.minutes = "full", args.frames or 24, 6, None
    if (args.minutes is None) == (args.frames is None):
        raise SystemExit("give one of --minutes or --frames")
    torch.set_grad_enabled(False)
    if args.model == "full":
        pipe, prompts = full_pipeline(args.tiny, args.rolling)
    else:
        pipe, prompts = toy_pipeline(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.rolling)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_results(args.out, rows, pipe.device, model=args.model, rolling=args.rolling,
                     frames_per_block=pipe.generator.num_frame_per_block, steps=len(pipe.schedule.timesteps),
                     window=pipe.window(None), switch_every=args.switch_every)

    gc.collect()
    stream(pipe, prompts, args.frames, args.minutes, args.interval, 60.0, args.switch_every, record)
    if not rows:
        print("the stream ended before the first interval", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
