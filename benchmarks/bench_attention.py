"""Attention kernels at the streaming shapes: speed and accuracy of each backend the entry point can use.

Part 1, kernels: ``[1, Lq, 12, 128]`` bf16 queries against ``Lk`` keys (one-frame and three-frame blocks against
short and full caches, a two-block fused call, the 512-token cross-attention); for SDPA with cuDNN first, SDPA
with PyTorch's flash kernel first, and the installed flash-attn package (FlashAttention-3/4/2, if any): median time,
TFLOP/s (4·heads·128·Lq·Lk FLOPs) and the relative error ``||out - ref|| / ||ref||`` against a float32 SDPA
recomputation of the same bf16 inputs.

With ``--kv_splits``, SDPA's cuDNN kernel also runs on 2..``attn.MAX_KV_SPLITS`` equal parts of the keys, merged by
their log-sum-exp (what the entry point does for few queries; ``sdpa_auto`` is the entry point's own choice,
``attn.kv_splits``), and FlashAttention-4, if installed, with ``num_splits`` 2..``attn.MAX_KV_SPLITS`` (its own
split-KV kernel; version 4.0.0b40 refuses it on Hopper, which the rows record). Times are of back-to-back eager calls
(the host's launches included: a split call's eager merge is five of them); with ``--graphs``, of replays of a CUDA
graph holding one call, the merge compiled: the GPU's time, as the pipeline's graphs run it.

Part 2, end to end (``--pipeline``): the full-size chunk-wise generator (random weights) streams the same 21 latent
frames under each backend; reports each video's relative difference from the cuDNN one. The PyTorch-flash video
gives the noise floor of merely changing the bf16 kernel.

    python benchmarks/bench_attention.py --pipeline --out bench_attention.json
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from common import cuda_graph_ms, cuda_ms, save_results, streaming_setup

from model import attention as attn
from model.config import get_preset


def shapes(cfg, latent_hw: tuple[int, int], frames: int = 21, chunk: int = 3) -> list[tuple[int, int]]:
    """``(Lq, Lk)`` of the streaming calls: one-frame and ``chunk``-frame blocks against their own block, part of
    and the whole ``frames``-frame cache, a two-block fused call, and the text."""
    s = (latent_hw[0] // cfg.patch_size[1]) * (latent_hw[1] // cfg.patch_size[2])  # tokens per latent frame
    c = chunk * s
    return [(s, s), (s, 3 * s), (s, 6 * s), (s, 12 * s), (s, frames * s), (c, cfg.text_len), (c, c), (c, 4 * c),
            (c, frames * s), (2 * c, frames * s)]


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

    def sdpa_auto():   # what attention_backend: sdpa runs: cuDNN first, keys split where attn.kv_splits says
        attn.set_backend("sdpa")
        attn.set_sdpa_priority(None)

    found = {"sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_auto": sdpa_auto,
             "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    if attn._load_flash() is not None:
        found[attn._flash_module] = lambda: attn.set_backend("flash_attn")
    return found


def kernels(rows: list, cfg, latent_hw: tuple[int, int], kv_splits: bool = False, graphs: bool = False) -> None:
    heads, d = cfg.num_heads, cfg.head_dim
    timer = cuda_graph_ms if graphs else cuda_ms
    attn.compile_merge(graphs)   # the pipeline's graphs replay the compiled merge; eager timing keeps it eager
    sms = attn._hopper_sms(torch.device("cuda"))   # 0 off Hopper: the entry point does not split there
    for lq, lk in shapes(cfg, latent_hw):
        q = torch.randn(1, lq, heads, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, lk, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        flops = 4 * heads * d * lq * lk
        for name, use in backends().items():
            use()
            ms = timer(lambda: attn.attention(q, k, v))
            row = dict(part="kernel", backend=name, lq=lq, lk=lk, ms=ms, tflops=flops / ms / 1e9, graphs=graphs,
                       rel_err=relative(attn.attention(q, k, v), ref))
            rows.append(row)
            print(f"Lq {lq:5d} Lk {lk:5d} {name:22s} {ms:7.3f} ms {row['tflops']:5.0f} TFLOP/s "
                  f"rel err {row['rel_err']:.2e}", flush=True)
        chosen = attn.kv_splits(lq, lk, heads, sms) if sms else 1
        for parts in range(2, attn.MAX_KV_SPLITS + 1) if kv_splits else ():
            if lk % parts:
                continue
            ms = timer(lambda: attn._split_kv_attention(q, k, v, parts))
            row = dict(part="kernel", backend=f"sdpa_cudnn_{parts}_parts", lq=lq, lk=lk, ms=ms, graphs=graphs,
                       tflops=flops / ms / 1e9, rel_err=relative(attn._split_kv_attention(q, k, v, parts), ref),
                       chosen_parts=chosen)
            rows.append(row)
            print(f"Lq {lq:5d} Lk {lk:5d} {row['backend']:22s} {ms:7.3f} ms {row['tflops']:5.0f} TFLOP/s "
                  f"rel err {row['rel_err']:.2e}{'  <- kv_splits' if parts == chosen else ''}", flush=True)
        if kv_splits and attn._flash_module == "flash_attn.cute":   # FlashAttention-4's own split-KV kernel
            for parts in range(2, attn.MAX_KV_SPLITS + 1):
                def fa4(parts=parts):
                    out = attn._flash_fn(q, k, v, num_splits=parts)
                    return out[0] if isinstance(out, tuple) else out
                try:
                    ms, err = timer(fa4), relative(fa4(), ref)
                except Exception as error:  # noqa: BLE001 - a split count the kernel refuses is a result
                    print(f"Lq {lq:5d} Lk {lk:5d} fa4 {parts} splits: {type(error).__name__}: {error}", flush=True)
                    rows.append(dict(part="kernel", backend=f"fa4_{parts}_splits", lq=lq, lk=lk, error=str(error)))
                    continue
                row = dict(part="kernel", backend=f"fa4_{parts}_splits", lq=lq, lk=lk, ms=ms, graphs=graphs,
                           tflops=flops / ms / 1e9, rel_err=err)
                rows.append(row)
                print(f"Lq {lq:5d} Lk {lk:5d} {row['backend']:22s} {ms:7.3f} ms {row['tflops']:5.0f} TFLOP/s "
                      f"rel err {err:.2e}", flush=True)


def pipeline(rows: list, setup) -> None:
    import bench_inference as bench

    device, dtype, preset, latent_shape, vae, ctx = setup  # the VAE is not used: decode is off
    pipe = bench.build(bench.MODES["chunk4"], dict(bench.VARIANTS["fast"], compile=False), vae, {},
                       device, preset, latent_shape, dtype)
    with torch.no_grad():  # Wan zero-inits the output head, which would make every video the same
        pipe.generator.head.head.weight.normal_(std=0.02)
    videos = {}
    for name, use in backends().items():
        use()
        videos[name] = torch.cat([c.latents for c in pipe.open("benchmark", num_latent_frames=21, seed=0, decode=False,
                                                                      context=ctx)], 1)
    for name, latents in videos.items():
        row = dict(part="pipeline", backend=name, rel_diff_vs_cudnn=relative(latents, videos["sdpa_cudnn"]))
        rows.append(row)
        print(f"chunk-wise 21 latent frames, {name:22s} relative difference from cuDNN "
              f"{row['rel_diff_vs_cudnn']:.2e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", action="store_true", help="also compare whole streamed videos (full-size model)")
    p.add_argument("--kv_splits", action="store_true",
                   help="also time cuDNN's kernel on 2..MAX_KV_SPLITS equal parts of the keys, merged")
    p.add_argument("--graphs", action="store_true",
                   help="time each call as replays of a CUDA graph holding it, the split merge compiled (the GPU's "
                        "time, as the pipeline runs them); default: back-to-back eager calls, merge eager")
    p.add_argument("--out", default="bench_attention.json", help="JSON output path")
    args = p.parse_args(argv)
    setup = streaming_setup(tiny=False)
    if setup is None:
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list = []
    kernels(rows, get_preset(setup[2]), setup[3][1:], kv_splits=args.kv_splits, graphs=args.graphs)
    if args.pipeline:
        pipeline(rows, setup)
    attn.set_backend("auto")
    attn.set_sdpa_priority(None)
    attn.compile_merge(False)
    save_results(args.out, rows, torch.device("cuda"), flash_attn=attn._flash_module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
