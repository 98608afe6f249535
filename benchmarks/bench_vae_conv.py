"""The Wan VAE decoder's causal 3x3x3 convolutions, one steady streaming call's shapes (one latent frame in: 1 frame
at 60x104, 2 at 120x208, 4 at 240x416 and 480x832), as cuDNN ``conv3d`` vs the same product as one ``conv2d`` over the
three input frames stacked along channels (weights ``[Cout, 3 Cin, 3, 3]``), and the cost of stacking the frames;
also ``conv3d`` on contiguous (NCDHW) tensors and with the output channels zero-padded to a multiple of 128.

Where ``conv2d`` wins, a decoder that writes its activations stacked (the copy fused into the norm/SiLU kernel that
already writes the cached frames) would decode faster. bf16, channels-last, cudnn.benchmark on; CUDA events, mean of
``--iters`` calls after 3 warm-up calls. Prints a table and writes JSON.

    python benchmarks/bench_vae_conv.py --out bench_vae_conv.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_ms, save_results  # noqa: E402

# channels, output frames, height, width, convolutions of this shape per steady call of the full-size decoder
SHAPES = [(96, 4, 480, 832, 6), (192, 4, 240, 416, 6), (384, 2, 120, 208, 5), (384, 1, 60, 104, 10)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--out", default="bench_vae_conv.json", help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.backends.cudnn.benchmark = True
    rows = []
    for c, t, h, w, count in SHAPES:
        x = torch.randn(1, c, t + 2, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        w3 = torch.randn(c, c, 3, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        w2 = w3.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3).contiguous(memory_format=torch.channels_last)

        def stack():  # frames (i, i+1, i+2) of x side by side on channels, one image per output frame
            frames = x.permute(0, 2, 3, 4, 1)  # [1, T+2, H, W, C], a view of the channels-last tensor
            stacked = torch.cat([frames[:, k:k + t] for k in range(3)], dim=-1)
            return stacked.reshape(t, h, w, 3 * c).permute(0, 3, 1, 2)  # NHWC [T, 3C, H, W]

        stacked = stack()
        a, b = F.conv3d(x, w3, padding=(0, 1, 1)), F.conv2d(stacked, w2, padding=1)
        rel = ((a[0].transpose(0, 1) - b).float().norm() / a.float().norm()).item()
        flops = 2 * 27 * c * c * t * h * w
        pad = -c % 128  # output channels zero-padded to a multiple of 128 (cuDNN tiles are 64 or 128 wide)
        w3p = F.pad(w3, (0, 0, 0, 0, 0, 0, 0, 0, 0, pad)).contiguous(memory_format=torch.channels_last_3d)
        xn, w3n = x.contiguous(), w3.contiguous()
        row = dict(channels=c, frames=t, height=h, width=w, per_call=count, rel_diff=rel,
                   conv3d_ms=cuda_ms(lambda: F.conv3d(x, w3, padding=(0, 1, 1)), args.iters),
                   conv3d_ncdhw_ms=cuda_ms(lambda: F.conv3d(xn, w3n, padding=(0, 1, 1)), args.iters),
                   conv3d_cout_padded_ms=cuda_ms(lambda: F.conv3d(x, w3p, padding=(0, 1, 1)), args.iters)
                   if pad else None,
                   conv2d_ms=cuda_ms(lambda: F.conv2d(stacked, w2, padding=1), args.iters),
                   stack_ms=cuda_ms(stack, args.iters))
        row.update(conv3d_tflops=flops / row["conv3d_ms"] / 1e9, conv2d_tflops=flops / row["conv2d_ms"] / 1e9)
        rows.append(row)
        print(f"C{c} x {t} frames {h}x{w}: conv3d {row['conv3d_ms']:.2f} ms ({row['conv3d_tflops']:.0f} TFLOP/s) | "
              f"conv2d {row['conv2d_ms']:.2f} ms ({row['conv2d_tflops']:.0f} TFLOP/s) + stacking "
              f"{row['stack_ms']:.2f} ms | relative difference {rel:.1e} | {count} per call | conv3d NCDHW "
              f"{row['conv3d_ncdhw_ms']:.2f} ms | conv3d with {c + pad} output channels "
              f"{row['conv3d_cout_padded_ms'] or float('nan'):.2f} ms", flush=True)
    for key in ("conv3d_ms", "conv2d_ms", "stack_ms"):
        print(f"per steady decoder call, {key[:-3]}: {sum(r[key] * r['per_call'] for r in rows):.1f} ms")
    save_results(args.out, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
