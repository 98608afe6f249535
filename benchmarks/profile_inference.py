"""Where the GPU time of one streaming video goes: kernels grouped by kind, for the whole run and per stream.

Runs one mode of ``bench_inference.py`` (same models, random weights, same variants) up to four ways after a
warm-up — end to end (DiT + streaming decode), DiT only, decode only (the streaming decoder over the same number of
latent frames), and up to the first decoded frame on the host — each under ``torch.profiler``, and reports per run:
wall time, GPU-busy time (union of kernel intervals), kernel time by kind (GEMM, attention, convolution, compiled
elementwise, copies, other) and by stream, when each stream worked (from the start of the call), where the whole GPU
stood idle and whether it was waiting for the host, and the most expensive kernels. Prints a table and writes JSON
(and Chrome traces with ``--traces``).

    python benchmarks/profile_inference.py --mode chunk4 --variant fast --out profile.json
    python benchmarks/profile_inference.py --tiny --out /tmp/profile.json   # CPU smoke test (no kernels to count)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import bench_inference as bench
import torch
from common import save_results, streaming_setup
from torch.profiler import ProfilerActivity, profile, record_function

from model.vae import WanVAE

KINDS = (  # first match wins; names as cuDNN / cuBLAS / inductor / ATen give them
    ("attention", ("sdpa", "fmha", "flash", "attention", "attn")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "winograd", "dgrad")),
    ("gemm", ("gemm", "nvjet", "cutlass", "matmul", "gemv")),
    ("compiled", ("triton",)),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
)


RUNS = ["end_to_end", "dit_only", "decode_only", "first_frame"]
TIMED = "profile_inference.timed"   # the mark the timeline counts from


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


HOST_EVENTS = ("python_function", "user_annotation", "cpu_op")   # what the host was running


def gpu_idle(events: list[dict], kernels: list[dict], origin: float, top: int) -> dict:
    """Where no stream runs a kernel, between the first kernel and the last (ms). A gap counts as the host's when the
    launch call of the kernel after it began after the gap had begun (the GPU waited for the host); otherwise that
    kernel waited on something else (another stream, an event, the order inside a CUDA graph, whose kernels share the
    ``cudaGraphLaunch`` they came from). For the longest gaps, the host's innermost calls at that late launch: Python
    functions with ``--stacks``, else ATen ops and ``record_function`` ranges."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    gaps, end, before = [], None, None
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            gaps.append((end, e["ts"], before, e))
        if end is None or e["ts"] + e["dur"] > end:
            end, before = e["ts"] + e["dur"], e

    def launch_of(kernel: dict) -> dict | None:
        return launches.get(kernel.get("args", {}).get("correlation"))

    def late(start: float, kernel: dict) -> bool:
        launch = launch_of(kernel)
        return launch is not None and launch["ts"] > start

    def host_at(t: float) -> list[str]:
        inside = [e for e in events if e.get("cat") in HOST_EVENTS and "dur" in e and e.get("name") != TIMED
                  and e["ts"] <= t <= e["ts"] + e["dur"]]
        return [e["name"][:100] for e in sorted(inside, key=lambda e: e["dur"])[:4]]   # innermost first

    rows = []
    for a, b, prev, nxt in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        launch = launch_of(nxt)
        row = dict(ms=(b - a) / 1e3, at_ms=(a - origin) / 1e3, before=prev["name"][:80],
                   before_stream=str(prev.get("args", {}).get("stream", "?")), after=nxt["name"][:80],
                   after_stream=str(nxt.get("args", {}).get("stream", "?")), host_late=late(a, nxt),
                   launch=launch["name"] if launch else None)
        if row["host_late"]:
            row["launched_ms_into_gap"] = (launch["ts"] - a) / 1e3
            row["host"] = host_at(launch["ts"])
        rows.append(row)
    late_gaps = [(a, b) for a, b, _, nxt in gaps if late(a, nxt)]
    return dict(ms=sum(b - a for a, b, _, _ in gaps) / 1e3, gaps=len(gaps),
                host_late_ms=sum(b - a for a, b in late_gaps) / 1e3, host_late_gaps=len(late_gaps), longest=rows)


def summarize(trace: dict, wall_s: float, top: int) -> dict:
    """Kernel statistics of a Chrome trace written by ``torch.profiler`` (times in ms)."""
    events = trace.get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e and "Launch" in e.get("name", "")]
    by_kind, by_stream, by_name = defaultdict(float), defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in kernels:
        ms = e["dur"] / 1e3
        by_kind[kind_of(e["name"])] += ms
        by_stream[str(e.get("args", {}).get("stream", "?"))] += ms
        by_name[e["name"]][0] += ms
        by_name[e["name"]][1] += 1
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    # when each stream worked, from the start of the timed call (its record_function mark)
    marks = [e["ts"] for e in events if e.get("name") == TIMED and "ts" in e]
    origin = min(marks) if marks else min((e["ts"] for e in kernels), default=0.0)
    spans = defaultdict(list)
    for e in kernels:
        spans[str(e.get("args", {}).get("stream", "?"))].append(((e["ts"] - origin) / 1e3,
                                                                  (e["ts"] + e["dur"] - origin) / 1e3, e["name"]))
    timeline = {}
    for stream, iv in spans.items():
        iv.sort()
        gaps = sorted(((b[0] - a[1], a[1], a[2][:80]) for a, b in zip(iv, iv[1:]) if b[0] > a[1]), reverse=True)
        timeline[stream] = dict(first_ms=iv[0][0], last_ms=max(b for _, b, _ in iv),
                                busy_ms=busy_time([(a, b) for a, b, _ in iv]),
                                idle_gaps=[dict(ms=g, at_ms=at, after=name) for g, at, name in gaps[:5]])
    return dict(wall_ms=wall_s * 1e3, kernels=len(kernels), kernel_ms=sum(by_kind.values()),
                launch_ms=sum(e["dur"] for e in launches) / 1e3,
                busy_ms=busy_time([(e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3) for e in kernels]),
                by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])), by_stream=dict(by_stream),
                timeline=timeline, gpu_idle=gpu_idle(events, kernels, origin, top),
                top=[dict(name=name[:160], ms=ms, calls=calls, kind=kind_of(name)) for name, (ms, calls) in heaviest])


def profiled(fn, trace_path: Path | None, top: int, stacks: bool = False) -> dict:
    """Run ``fn`` under the profiler (``stacks``: with Python stacks); its kernel summary."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_stack=stacks) as prof:
        bench.sync()
        start = time.perf_counter()
        with record_function(TIMED):
            fn()
        bench.sync()
        wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = trace_path or Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(Path(path).read_text())
    return summarize(trace, wall, top)


def first_chunk(pipe, ctx: torch.Tensor, frames: int) -> None:
    """Up to the video's first decoded frame on the host (what the caller waits for first), then stop the stream."""
    stream = pipe.open("benchmark", num_latent_frames=frames, seed=0, decode=True, context=ctx, uint8=True)
    next(stream).frames.to("cpu")
    stream.close()


def decode_all(vae: WanVAE, latents: torch.Tensor, frames_per_block: int) -> None:
    """The streaming decoder over ``latents`` block by block, the first frame alone (as the pipeline does)."""
    stream = vae.stream(1)
    stream.decode_chunk(latents[:, :1])
    for i in range(1, latents.shape[1], frames_per_block):
        stream.decode_chunk(latents[:, i:i + frames_per_block])


def profile_runs(args, setup, mode: dict, variant: dict) -> list[dict]:
    """The three profiled runs of ``mode`` under ``variant``, each after a warm-up; one summary row each."""
    device, dtype, preset, latent_shape, vae, ctx = setup
    pipe = bench.build(mode, variant, vae, {}, device, preset, latent_shape, dtype)
    frames = min(mode["frames"], 21)
    latents = torch.randn(1, frames, *latent_shape, device=device, dtype=dtype)
    runs = {
        "end_to_end": lambda: bench.run_once(pipe, ctx, frames, decode=True),
        "dit_only": lambda: bench.run_once(pipe, ctx, frames, decode=False),
        "decode_only": lambda: decode_all(vae, latents, mode["n"]),
        "first_frame": lambda: first_chunk(pipe, ctx, frames),
    }
    traces = Path(args.traces) if args.traces else None
    if traces:
        traces.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, fn in runs.items():
        if name not in args.runs:
            continue
        fn()  # warm-up: compile, cuDNN plans, allocator
        row = dict(run=name, mode=args.mode, variant=args.variant,
                   **profiled(fn, traces / f"{name}.json" if traces else None, args.top, args.stacks))
        rows.append(row)
        kinds = " | ".join(f"{k} {v:.0f}" for k, v in row["by_kind"].items())
        print(f"{name:12s} wall {row['wall_ms']:7.1f} ms | GPU busy {row['busy_ms']:7.1f} ms | kernels "
              f"{row['kernel_ms']:7.1f} ms ({row['kernels']}) | launches {row['launch_ms']:6.1f} ms | {kinds}",
              flush=True)
        for stream, t in row["timeline"].items():
            print(f"    stream {stream}: kernels from {t['first_ms']:.1f} to {t['last_ms']:.1f} ms, busy "
                  f"{t['busy_ms']:.1f} ms; longest idle: " + ", ".join(f"{g['ms']:.2f} ms at {g['at_ms']:.1f} after "
                                                                    f"{g['after'][:40]}" for g in t["idle_gaps"][:3]))
        idle = row["gpu_idle"]
        print(f"    GPU idle {idle['ms']:.1f} ms in {idle['gaps']} gaps, {idle['host_late_ms']:.1f} ms of them "
              f"({idle['host_late_gaps']} gaps) waiting for the host; longest: " + ", ".join(
                  f"{g['ms']:.2f} ms at {g['at_ms']:.1f} ({'host' if g['host_late'] else 'other'}: "
                  f"{(g.get('host') or [g['after']])[0][:40]})" for g in idle["longest"][:3]))
        for k in row["top"]:
            print(f"    {k['ms']:8.1f} ms {k['calls']:5d}x {k['kind']:11s} {k['name'][:110]}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="chunk4", choices=bench.MODES, help="bench_inference.py's mode to profile")
    p.add_argument("--variant", default="fast", choices=bench.VARIANTS, help="bench_inference.py's variant")
    p.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS, help="which ways to run the mode")
    p.add_argument("--top", type=int, default=15, help="heaviest kernels listed per run")
    p.add_argument("--out", default="profile_inference.json", help="JSON output path")
    p.add_argument("--traces", default=None, help="folder for the Chrome traces (not kept without it)")
    p.add_argument("--stacks", action="store_true",
                   help="record Python stacks, so that the GPU's idle gaps name the host functions that launched "
                        "late (slows the host: its timings are not the benchmark's)")
    p.add_argument("--tiny", action="store_true", help="smoke test on the CPU with tiny random models")
    args = p.parse_args(argv)
    setup = streaming_setup(args.tiny)
    if setup is None:
        print("this script needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    mode, variant = bench.MODES[args.mode], bench.VARIANTS[args.variant]
    bench.prepare(variant)
    rows = profile_runs(args, setup, mode, variant)
    save_results(args.out, rows, setup[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
