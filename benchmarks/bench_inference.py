r"""Inference speed of the streaming pipeline: full-size Wan2.1-1.3B generator + full Wan VAE, random weights.

Speed does not depend on weight values, so no download is needed. Text embeddings are random ``[1, 512, 4096]``
tensors made once outside the timed region (the text encoder runs once per prompt, not per frame).

For each mode (chunk-wise 4-step, frame-wise 4/2/1-step, a long video with a sliding window) and each variant, it
reports: end-to-end FPS (generation + streaming VAE decode + uint8 frames copied to the host, the number users mean),
DiT-only FPS, time to the first decoded frame, mean per-block time, peak GPU memory, and per run the FPS, first
frame, garbage-collection time and cudaMalloc / cudaFree / retry counts. Warm-up first, then the median of
``--runs`` runs. Prints a table and writes JSON (device name and versions included).

The pipeline is the one ``inference.py`` builds on CUDA (``StreamingPipeline.enable_fast_path``); a variant changes
only what a user can change (``--no_compile``, ``attention_backend``, ``--preview_decoder``) or, for an A/B of a
lever that has no switch, patches it out here.

    python benchmarks/bench_inference.py --out bench.json --modes chunk4 frame4 frame2 frame1 long \
        --variants fast fast_sdpa
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from common import save_results, streaming_setup

from model import attention as attn
from model import kv_cache
from model.fp8 import convert_to_fp8
from model.loader import build_wan_model
from model.masks import BlockLayout
from model.preview_decoder import TinyVideoDecoder
from model.scheduler import FlowMatchScheduler
from model.vae import WanVAE
from pipeline import components as C
from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline

DEFAULT_FLASH_MIN_QUERIES = attn.FLASH_MIN_QUERIES

MODES = {  # frames per block, nominal steps, first-block steps, latent frames, window, sink
    "chunk4": dict(n=3, steps=[1000, 750, 500, 250], first=None, frames=21),
    "frame4": dict(n=1, steps=[1000, 750, 500, 250], first=None, frames=21),
    "frame2": dict(n=1, steps=[1000, 500], first=[1000, 750, 500, 250], frames=21),
    "frame1": dict(n=1, steps=[1000], first=[1000, 750, 500, 250], frames=21),
    "long": dict(n=3, steps=[1000, 750, 500, 250], first=None, frames=240, window=21, sink=3),
}
VARIANTS = {  # "fast" is the default path of inference.py / StreamingPipeline.from_config on CUDA
    "fast": dict(),                                # FlashAttention-4 for large calls when installed, else SDPA
    "fast_sdpa": dict(backend="sdpa"),             # attention_backend: sdpa (what runs without flash-attn-4)
    "fast_fa4_one_frame": dict(flash_min_queries=1024),  # A/B: FlashAttention-4 also for one-frame blocks
    "fast_no_kv_split": dict(kv_split=False),      # A/B: cuDNN attention never on split keys
    "fast_split_q_copy": dict(split_q_view=False),  # A/B: each key part gets its own copy of the queries
    "fast_cache_copy": dict(direct_write=False),   # A/B: K/V copied into the cache, not stored by the projections
    "no_compile": dict(compile=False),             # --no_compile: DiT and VAE decoder eager
    "no_compile_fa4_one_frame": dict(compile=False, flash_min_queries=1024),  # the same A/B, eager
    "fast_preview": dict(preview=True),            # --preview_decoder (released size, random weights)
    "fast_eager_vae": dict(compile_vae=False),     # A/B: the VAE decoder regions eager, the DiT compiled
    "fast_no_graphs": dict(graphs=False),          # A/B: compiled regions, no CUDA graphs
    "fast_lazy_cross": dict(lazy_cross=True),      # A/B: a video's first DiT call fills the cross K/V itself, eagerly
    "fast_autotune": dict(autotune=True),          # A/B: the DiT regions compiled with inductor's max-autotune
    "fast_fp8": dict(fp8=True),                    # --fp8: the DiT blocks' products in fp8 (list fp8 variants last)
}


def prepare(variant: dict) -> None:
    """Process-wide settings of a variant, before its pipelines are built (the attention backend, as the config key
    ``attention_backend`` sets it)."""
    attn.set_backend(variant.get("backend", "auto"))
    attn.FLASH_MIN_QUERIES = variant.get("flash_min_queries", DEFAULT_FLASH_MIN_QUERIES)
    attn.set_kv_split(variant.get("kv_split", True))
    attn.SPLIT_Q_VIEW = variant.get("split_q_view", True)
    kv_cache.DIRECT_WRITE = variant.get("direct_write", True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(mode: dict, variant: dict, vae: WanVAE, models: dict, device, preset: str,
          latent_shape: tuple[int, int, int], dtype) -> StreamingPipeline:
    if "generator" not in models:  # ONE generator for every mode: peak memory must not count a second copy
        models["generator"] = build_wan_model(preset, causal=True, dtype=dtype, device=device).eval()
    gen = models["generator"]
    if variant.get("fp8", False) != models.get("fp8", False):
        if not variant.get("fp8"):
            raise SystemExit("the generator is converted to fp8 in place: list the fp8 variants last")
        convert_to_fp8(gen)
        models["fp8"] = True
    gen.layout = BlockLayout(mode["n"], False)  # frames per block is run-time configuration, not weights
    gen.uncompile_blocks()  # the previous variant's compilation
    sch = FlowMatchScheduler(shift=5.0)
    schedule = StepSchedule.from_config(sch, mode["steps"], mode["first"])
    preview = None
    if variant.get("preview"):
        if "preview" not in models:
            models["preview"] = TinyVideoDecoder().to(device, dtype)
            if device.type == "cuda":
                models["preview"].to_channels_last()
        preview = models["preview"]
    pipe = StreamingPipeline(gen, None, vae, sch, schedule, latent_shape=latent_shape,
                             local_attn_size=mode.get("window", -1), sink_size=mode.get("sink", 0),
                             default_num_frames=21, device=device, dtype=dtype, preview_decoder=preview)
    # as inference.py; a no-op on the CPU
    pipe.enable_fast_path(compile=variant.get("compile", True), graphs=variant.get("graphs"))
    if variant.get("autotune"):   # GEMMs inside the regions benchmarked against Triton templates, epilogues fused
        gen.uncompile_blocks()
        gen.compile_blocks(mode="max-autotune-no-cudagraphs")
    if pipe.graphs is not None:
        pipe.graphs.fill_cross_ahead = not variant.get("lazy_cross", False)
    if "text_encoder" in models:   # placed as StreamingPipeline.from_config places it
        if "text_encoder_on_gpu" not in models and device.type == "cuda":
            working = C.video_working_bytes(gen.config, latent_shape, pipe.default_num_frames,
                                            next(gen.parameters()).element_size(), torch.cuda.memory_allocated(device))
            models["text_encoder_on_gpu"] = C.place_text_encoder(models["text_encoder"], device, working)
        pipe.text_encoder = models["text_encoder"]   # on the CPU: streamed per new prompt (stream_device)
    if not variant.get("compile_vae", True):
        vae.compile_decoder(False)
    return pipe


class _GcTimer:
    """Wall time the Python garbage collector spends during a run (``gc.callbacks``), by generation."""

    def __init__(self):
        self.seconds, self.count, self._t = [0.0, 0.0, 0.0], [0, 0, 0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._t
            self.count[info["generation"]] += 1

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def _allocator_counts() -> dict:
    """cudaMalloc / cudaFree calls and allocation retries (a retry frees the cached blocks: a device sync)."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def zero_text_encoder(tiny: bool):
    """UMT5-XXL at full size with zero weights on the CPU (memory and transfer times do not depend on the values), with
    the toy folder's tokenizer; a tiny encoder for --tiny."""
    from transformers import UMT5EncoderModel

    from model.text_encoder import umt5_config
    from toy.folders import TINY_T5

    config = umt5_config(**(TINY_T5 if tiny else {}))
    with torch.device("meta"):
        encoder = UMT5EncoderModel(config).to(torch.bfloat16)   # no memory yet
    encoder = encoder.to_empty(device="cpu")
    encoder.tie_weights()   # to_empty gives each module its own tensor: one embedding table again, as loaded
    for t in [*encoder.parameters(), *encoder.buffers()]:
        t.data.zero_()
    return benchmark_text_encoder(encoder, tiny)


def benchmark_text_encoder(model, tiny: bool):
    """A ``TextEncoder`` over the UMT5 ``model``: the toy folder's tokenizer, Wan's 512 tokens (16 for --tiny)."""
    from model.text_encoder import TextEncoder, load_tokenizer

    folder = Path(__file__).resolve().parent.parent / "assets/toy/Toy-T2V/google/umt5-xxl"
    return TextEncoder(model, load_tokenizer(folder), text_len=16 if tiny else 512)


def run_once(pipe: StreamingPipeline, ctx: torch.Tensor, frames: int, decode: bool) -> dict:
    with _GcTimer() as gc_timer:
        before = _allocator_counts()
        out = _run_once(pipe, ctx, frames, decode)
        after = _allocator_counts()
    out.update({k: after[k] - before[k] for k in after}, gc_seconds=gc_timer.seconds, gc_count=gc_timer.count)
    return out


def _run_once(pipe: StreamingPipeline, ctx: torch.Tensor, frames: int, decode: bool) -> dict:
    sync()
    start = time.perf_counter()
    first, first_block, block_times, pixel_frames, last = None, None, [], 0, start
    # frames leave the GPU block by block as uint8, as inference.py and the demo take them
    context = None if pipe.text_encoder is not None else ctx   # with a text encoder: the cached prompt embedding
    for chunk in pipe.open("benchmark", num_latent_frames=frames, seed=0, decode=decode, context=context,
                           uint8=decode):
        if decode:
            host = chunk.frames.to("cpu")   # already on the host (pinned copy) on the overlapped path
            pixel_frames += host.shape[1]
        else:
            sync()
            pixel_frames += 4 * chunk.latents.shape[1] - (3 if chunk.block_index == 0 else 0)
        now = time.perf_counter()
        first = first or now - start
        if chunk.block_index == 0:  # the first frame may leave alone; the block is complete with its last chunk
            first_block = now - start
            if chunk.start_frame + chunk.latents.shape[1] < pipe.generator.num_frame_per_block:
                continue  # block times are whole blocks
        block_times.append(now - last)
        last = now
    total = time.perf_counter() - start
    return dict(seconds=total, fps=pixel_frames / total, first_frame_s=first, first_block_s=first_block,
                pixel_frames=pixel_frames,
                mean_block_s=statistics.mean(block_times), steady_block_s=statistics.median(block_times[1:] or
                                                                                            block_times))


def measure(pipe, ctx, frames: int, runs: int, decode: bool) -> dict:
    t = time.perf_counter()
    run_once(pipe, ctx, frames if frames <= 21 else 21, decode)  # warm-up (compile, cuDNN plans, allocator)
    warmup_s = time.perf_counter() - t
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    results = [run_once(pipe, ctx, frames, decode) for _ in range(runs)]
    med = {k: statistics.median(r[k] for r in results) for k in results[0]
           if not isinstance(results[0][k], list)}
    med["fps_runs"] = [r["fps"] for r in results]
    med["first_frame_runs"] = [r["first_frame_s"] for r in results]
    # per run: what could stall the host -- garbage collection, cudaMalloc/cudaFree (the latter syncs the device)
    med["host_runs"] = [{k: r[k] for k in ("gc_seconds", "gc_count", "num_device_alloc", "num_device_free",
                                           "num_alloc_retries") if k in r} for r in results]
    med["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    med["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    med["warmup_s"] = warmup_s
    return med


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["chunk4", "frame4", "frame2", "frame1", "long"], choices=MODES,
                   help="block size, steps and length of each timed video (the MODES table of this script)")
    p.add_argument("--variants", nargs="+", default=["fast"], choices=VARIANTS,
                   help="pipeline settings to time (the VARIANTS table of this script; fast is what inference.py runs)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--long_runs", type=int, default=1, help="timed runs of the long video")
    p.add_argument("--dit_runs", type=int, default=None, help="timed runs without decoding (default: --runs)")
    p.add_argument("--out", default="bench_inference.json", help="JSON output path")
    p.add_argument("--tiny", action="store_true", help="smoke test on the CPU with tiny random models")
    p.add_argument("--cap_gib", type=float, default=None,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 24")
    p.add_argument("--text_encoder", action="store_true",
                   help="also hold a full-size UMT5-XXL (zero weights), placed as from_config places it (on the GPU "
                        "when it fits beside a video, else streamed per new prompt); prompts go through it")
    p.add_argument("--text_encoder_int8", action="store_true",
                   help="with --text_encoder: its weights stored in int8 (text_encoder_int8), placed by the same rule")
    args = p.parse_args(argv)
    if args.cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    setup = streaming_setup(args.tiny)
    if setup is None:
        print("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    device, dtype, preset, latent_shape, vae, ctx = setup
    models, rows = {}, []
    if args.text_encoder:
        models["text_encoder"] = zero_text_encoder(args.tiny)
        # as from_config builds it: embeddings returned and cached on the video's device, wherever the weights are
        # (streamed from the CPU, they would otherwise stay on the host and be copied up for every video)
        models["text_encoder"].output_device = device
        if args.text_encoder_int8:
            models["text_encoder"].to_int8()
    for variant_name in args.variants:
        variant = VARIANTS[variant_name]
        prepare(variant)
        for mode_name in args.modes:
            mode = MODES[mode_name]
            pipe = build(mode, variant, vae, models, device, preset, latent_shape, dtype)
            runs = args.long_runs if mode_name == "long" else args.runs
            e2e = measure(pipe, ctx, mode["frames"], runs, decode=True)
            dit = measure(pipe, ctx, mode["frames"], min(runs, args.dit_runs or runs), decode=False)
            encode_s = None
            if "text_encoder" in models:   # a prompt not seen yet: the encoder's full cost (streamed or resident)
                sync()
                t = time.perf_counter()
                pipe.encode([f"a new prompt for {mode_name} {variant_name}"])
                sync()
                encode_s = time.perf_counter() - t
            row = dict(mode=mode_name, variant=variant_name, fps=e2e["fps"], dit_fps=dit["fps"],
                       first_frame_s=e2e["first_frame_s"], first_block_s=e2e["first_block_s"],
                       seconds=e2e["seconds"], dit_seconds=dit["seconds"],
                       mean_block_s=e2e["mean_block_s"], steady_block_s=e2e["steady_block_s"],
                       peak_gib=max(e2e["peak_gib"], dit["peak_gib"]), pixel_frames=e2e["pixel_frames"],
                       warmup_s=e2e["warmup_s"], dit_peak_gib=dit["peak_gib"], fps_runs=e2e["fps_runs"],
                       first_frame_runs=e2e["first_frame_runs"], host_runs=e2e["host_runs"],
                       reserved_gib=max(e2e["reserved_gib"], dit["reserved_gib"]), encode_s=encode_s,
                       text_encoder_on_gpu=models.get("text_encoder_on_gpu"),
                       text_encoder_gib=sum(p.nbytes for p in models["text_encoder"].parameters()) / 2**30
                       if "text_encoder" in models else None,
                       cuda_graphs=pipe.graphs.num_graphs if pipe.graphs else 0)
            rows.append(row)
            print(f"{mode_name:7s} {variant_name:15s} e2e {row['fps']:6.1f} FPS | DiT {row['dit_fps']:6.1f} FPS | "
                  f"first frame {row['first_frame_s']:.3f} s (block {row['first_block_s']:.3f} s) | "
                  f"block {row['mean_block_s'] * 1e3:6.1f} ms | "
                  f"peak {row['peak_gib']:.1f} GiB (reserved {row['reserved_gib']:.1f}) | warm-up "
                  f"{row['warmup_s']:.0f} s | graphs {row['cuda_graphs']} | encode {encode_s}", flush=True)
            host = row["host_runs"]
            print(f"    runs: FPS {[round(v, 1) for v in row['fps_runs']]} first frame "
                  f"{[round(v, 3) for v in row['first_frame_runs']]} | GC s "
                  f"{[round(sum(h['gc_seconds']), 3) for h in host]}"
                  f" | cudaMalloc {[h.get('num_device_alloc') for h in host]} cudaFree "
                  f"{[h.get('num_device_free') for h in host]} retries {[h.get('num_alloc_retries') for h in host]}",
                  flush=True)
            save_results(args.out, rows, device, flash_attn=attn._flash_module, cap_gib=args.cap_gib,  # row by row
                         text_encoder_int8=args.text_encoder_int8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
