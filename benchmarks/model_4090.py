"""A model, not a measurement: how fast streaming generation would run on an RTX 4090 (24 GB), from the work of a
video and what the H200 achieves on each kind of it.

Work of one 81-frame video (480x832, Wan2.1-1.3B), counted from the shapes of every forward the block loop runs
(each block's steps, the context pass fused into the next block's first step): matrix-product FLOPs (the block
products: q/k/v, output, cross query and output, FFN), attention FLOPs (``4 · Lq · Lk · dim`` per layer, self and
text), and the bytes of weights and KV cache each forward reads. Time on a GPU = product FLOPs / (peak x the H200's
achieved fraction) + attention FLOPs / (peak x fraction) + elementwise and VAE time scaled from the H200 by the
ratio of the two GPUs' memory bandwidth (elementwise) or bf16 peak (the VAE's convolutions).

Rates (dense, no sparsity): H200 SXM bf16 989 TFLOP/s, fp8 1,979, 4.8 TB/s (NVIDIA H200 datasheet); RTX 4090 bf16
with float32 accumulation 165.2 TFLOP/s, fp8 with float32 accumulation 330.3, 1,008 GB/s (NVIDIA Ada Lovelace
architecture whitepaper, GeForce RTX 4090 column). Measured H200 shares (``--h200_*``, from
``benchmarks/profile_inference.py`` and docs/performance.md): chunk-wise 4-step DiT 1.09 s attention at ~516
TFLOP/s, 0.56 s products at ~590, 0.18 s elementwise, VAE decode 0.69 s of GPU time per video.

    python benchmarks/model_4090.py [--out model_4090.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import common  # noqa: F401  (this checkout's packages first on sys.path)

from model.config import get_preset

RATES = {  # TFLOP/s dense, TB/s
    "H200": dict(bf16=989.0, fp8=1979.0, bandwidth=4.8),
    "RTX 4090": dict(bf16=165.2, fp8=330.3, bandwidth=1.008),
}
MODES = {  # frames per block, steps per block (block 0 first), latent frames
    "chunk-wise 4-step": (3, 4, 4, 21),
    "frame-wise 4-step": (1, 4, 4, 21),
    "frame-wise 2-step": (1, 2, 4, 21),
}


def video_work(frames_per_block: int, steps: int, first_steps: int, frames: int, h: int = 60, w: int = 104) -> dict:
    """FLOPs of products and attention, and bytes read, of one video (module docstring)."""
    cfg = get_preset("wan2.1-t2v-1.3b")
    tokens = cfg.tokens_per_frame(h, w)
    d, layers = cfg.dim, cfg.num_layers
    per_token_products = 2 * d * (3 * d + d + d + d + 2 * cfg.ffn_dim)     # q/k/v, o, cross q, cross o, FFN
    weights = 2 * layers * d * (3 * d + 3 * d + 2 * cfg.ffn_dim)           # bf16 bytes of those products
    out = dict(product_flops=0.0, attention_flops=0.0, bytes=0.0, forwards=0)
    for start in range(0, frames, frames_per_block):
        n = frames_per_block
        for step in range(first_steps if start == 0 else steps):
            q_frames = n + (frames_per_block if step == 0 and start > 0 else 0)   # fused context pass
            lq, lk = q_frames * tokens, (start + n) * tokens
            out["product_flops"] += layers * lq * per_token_products
            out["attention_flops"] += layers * 4 * lq * (lk + cfg.text_len) * d
            out["bytes"] += weights + layers * 2 * lk * d * 2                     # weights + K and V read
            out["forwards"] += 1
    return out


def model(args) -> dict:
    h200 = RATES["H200"]
    attn_eff = args.h200_attention_tflops / h200["bf16"]
    gemm_eff = args.h200_gemm_tflops / h200["bf16"]
    ref = video_work(*MODES["chunk-wise 4-step"])
    rows = []
    for mode, spec in MODES.items():
        work = video_work(*spec)
        # elementwise time scales with the products' token count
        elementwise = args.h200_elementwise_s * work["product_flops"] / ref["product_flops"]
        for gpu, r in RATES.items():
            for products in ("bf16", "fp8"):
                gemm = work["product_flops"] / (r[products] * 1e12 * gemm_eff)
                attention = work["attention_flops"] / (r["bf16"] * 1e12 * attn_eff)
                rest = elementwise * h200["bandwidth"] / r["bandwidth"]
                vae = args.h200_vae_s * h200["bf16"] / r["bf16"]
                total = gemm + attention + rest + vae
                rows.append(dict(mode=mode, gpu=gpu, products=products, gemm_s=gemm, attention_s=attention,
                                 elementwise_s=rest, vae_s=vae, fps=81 / total, real_time=81 / total >= 16,
                                 tflop=(work["product_flops"] + work["attention_flops"]) / 1e12,
                                 gb_read=work["bytes"] / 1e9, forwards=work["forwards"]))
    return dict(rates=RATES, h200_measured=vars(args), rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h200_attention_tflops", type=float, default=516.0, help="attention rate achieved on the H200")
    p.add_argument("--h200_gemm_tflops", type=float, default=590.0, help="GEMM rate achieved on the H200")
    p.add_argument("--h200_elementwise_s", type=float, default=0.18, help="chunk-wise 4-step, one video")
    p.add_argument("--h200_vae_s", type=float, default=0.69, help="GPU time of one video's VAE decode")
    p.add_argument("--out", default=None, help="JSON output path (none: print only)")
    args = p.parse_args(argv)
    result = model(args)
    for r in result["rows"]:
        print(f"{r['mode']:18s} {r['gpu']:8s} products {r['products']:4s}: {r['fps']:5.1f} FPS "
              f"(products {r['gemm_s']:.2f} s, attention {r['attention_s']:.2f} s, elementwise "
              f"{r['elementwise_s']:.2f} s, VAE {r['vae_s']:.2f} s; {r['tflop']:.0f} TFLOP, {r['gb_read']:.0f} GB)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "h200_measured"} | {"h200_measured": {
                k: v for k, v in result["h200_measured"].items() if k != "out"}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
