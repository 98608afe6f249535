"""Attention kernels at the streaming shapes: speed and accuracy of each backend the entry point can use.

Part 1, kernels: ``[1, Lq, 12, 128]`` bf16 queries against ``Lk`` keys (one-frame and three-frame blocks against
short and full caches, a two-block fused call, the 512-token cross-attention); for SDPA with cuDNN first, SDPA
with PyTorch's flash kernel first, and the installed flash-attn package (FlashAttention-3/4/2, if any): median time,
TFLOP/s (4·heads·128·Lq·Lk FLOPs) and the relative error ``||out - ref|| / ||ref||`` against a float32 SDPA
recomputation of the same bf16 inputs.

Part 2, end to end (``--pipeline``): the full-size chunk-wise generator (random weights) streams the same 21 latent
frames under each backend; reports each video's relative difference from the cuDNN one. The PyTorch-flash video
gives the noise floor of merely changing the bf16 kernel.

    python benchmarks/bench_attention.py --pipeline --out bench_attention.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_results  # noqa: E402
from model import attention as attn  # noqa: E402

SHAPES = [(1560, 1560), (1560, 32760), (4680, 512), (4680, 4680), (4680, 18720), (4680, 32760), (9360, 32760)]


def timed(fn, iters: int = 20) -> float:
    """Mean time of ``iters`` back-to-back calls after 3 warm-up calls, in ms (CUDA events)."""
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


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def backends() -> dict:
    """name -> function setting the entry point up for it."""
    from torch.nn.attention import SDPBackend

    def sdpa(first):
        def use():
            attn.set_backend("sdpa")
            attn.set_sdpa_priority([first, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                    SDPBackend.MATH])
        return use

    found = {"sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    if attn._load_flash() is not None:
        found[attn._flash_module] = lambda: attn.set_backend("flash_attn")
    return found


def kernels(rows: list) -> None:
    for lq, lk in SHAPES:
        q = torch.randn(1, lq, 12, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, lk, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        flops = 4 * 12 * 128 * lq * lk
        for name, use in backends().items():
            use()
            ms = timed(lambda: attn.attention(q, k, v))
            row = dict(part="kernel", backend=name, lq=lq, lk=lk, ms=ms, tflops=flops / ms / 1e9,
                       rel_err=relative(attn.attention(q, k, v), ref))
            rows.append(row)
            print(f"Lq {lq:5d} Lk {lk:5d} {name:22s} {ms:7.3f} ms {row['tflops']:5.0f} TFLOP/s "
                  f"rel err {row['rel_err']:.2e}", flush=True)


def pipeline(rows: list) -> None:
    from benchmarks import bench_inference as bench
    from model.vae import WAN21_VAE_CONFIG, WanVAE

    vae = WanVAE.from_config(**WAN21_VAE_CONFIG).to("cuda", torch.bfloat16)  # unused: decode is off
    pipe = bench.build(bench.MODES["chunk4"], dict(bench.VARIANTS["fast"], compile=False), vae, {},
                       torch.device("cuda"), "wan2.1-t2v-1.3b", (16, 60, 104), torch.bfloat16)
    with torch.no_grad():  # Wan zero-inits the output head, which would make every video the same
        pipe.generator.head.head.weight.normal_(std=0.02)
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    videos = {}
    for name, use in backends().items():
        use()
        videos[name] = torch.cat([c.latents for c in pipe.open("benchmark", 21, seed=0, decode=False, context=ctx)], 1)
    for name, latents in videos.items():
        row = dict(part="pipeline", backend=name, rel_diff_vs_cudnn=relative(latents, videos["sdpa_cudnn"]))
        rows.append(row)
        print(f"chunk-wise 21 latent frames, {name:22s} relative difference from cuDNN "
              f"{row['rel_diff_vs_cudnn']:.2e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", action="store_true", help="also compare whole streamed videos (full-size model)")
    p.add_argument("--out", default="bench_attention.json", help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list = []
    kernels(rows)
    if args.pipeline:
        pipeline(rows)
    attn.set_backend("auto")
    attn.set_sdpa_priority(None)
    save_results(args.out, rows, torch.device("cuda"), flash_attn=attn._flash_module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
