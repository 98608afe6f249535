"""The Wan VAE decoder's causal 3x3x3 convolutions at one steady streaming call's shapes (one latent frame in: 1 frame
at 60x104, 2 at 120x208, 4 at 240x416 and 480x832): cuDNN ``conv3d`` channels-last (as the decoder runs them), on
contiguous (NCDHW) tensors, and with the output channels zero-padded to a multiple of 128 (what
``model.vae_decoder.PAD_OUT_CHANNELS`` does for the 96-channel stage on CUDA). Then the decoder's last convolution
(``conv_out``: 96 channels in, 3 out, four 480x832 frames a call) as it is and computed with ``--out_pad`` output
channels (zero weights, the extra ones dropped), since a 3-wide output is a poor fit for any GEMM tile.

bf16, cudnn.benchmark on; CUDA events, mean of ``--iters`` calls after 3 warm-up calls. Prints a table and writes
JSON.

    python benchmarks/bench_vae_conv.py --out bench_vae_conv.json
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from common import cuda_ms, save_results

# channels, output frames, height, width, convolutions of this shape per steady call of the full-size decoder
SHAPES = [(96, 4, 480, 832, 6), (192, 4, 240, 416, 6), (384, 2, 120, 208, 5), (384, 1, 60, 104, 10)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--out_pad", type=int, nargs="*", default=[8, 16, 32, 64, 128],
                   help="output-channel counts the 3-channel conv_out is also timed with")
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
        pad = -c % 128  # output channels zero-padded to a multiple of 128 (cuDNN tiles are 64 or 128 wide)
        w3p = F.pad(w3, (0, 0, 0, 0, 0, 0, 0, 0, 0, pad)).contiguous(memory_format=torch.channels_last_3d)
        xn, w3n = x.contiguous(), w3.contiguous()
        row = dict(channels=c, frames=t, height=h, width=w, per_call=count,
                   conv3d_ms=cuda_ms(lambda: F.conv3d(x, w3, padding=(0, 1, 1)), args.iters),
                   conv3d_ncdhw_ms=cuda_ms(lambda: F.conv3d(xn, w3n, padding=(0, 1, 1)), args.iters),
                   conv3d_cout_padded_ms=cuda_ms(lambda: F.conv3d(x, w3p, padding=(0, 1, 1)), args.iters)
                   if pad else None)
        row["conv3d_tflops"] = 2 * 27 * c * c * t * h * w / row["conv3d_ms"] / 1e9
        rows.append(row)
        print(f"C{c} x {t} frames {h}x{w}: conv3d {row['conv3d_ms']:.2f} ms ({row['conv3d_tflops']:.0f} TFLOP/s) | "
              f"NCDHW {row['conv3d_ncdhw_ms']:.2f} ms | with {c + pad} output channels "
              f"{row['conv3d_cout_padded_ms'] or float('nan'):.2f} ms | {count} per call", flush=True)
    # conv_out: 96 -> 3 channels at full resolution, once per steady call
    x = torch.randn(1, 96, 4 + 2, 480, 832, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    w3 = torch.randn(3, 96, 3, 3, 3, device=device, dtype=dtype)
    ref = F.conv3d(x.float(), w3.float(), padding=(0, 1, 1))   # float32 reference
    row = dict(conv="conv_out", channels_in=96, channels_out=3, frames=4, height=480, width=832, per_call=1)
    for out in [3, *args.out_pad]:
        wp = F.pad(w3, (0, 0, 0, 0, 0, 0, 0, 0, 0, out - 3)).contiguous(memory_format=torch.channels_last_3d)
        row[f"out{out}_ms"] = cuda_ms(lambda: F.conv3d(x, wp, padding=(0, 1, 1))[:, :3], args.iters)
        got = F.conv3d(x, wp, padding=(0, 1, 1))[:, :3].float()
        row["rel_diff_unpadded" if out == 3 else f"out{out}_rel_diff"] = ((got - ref).norm() / ref.norm()).item()
    rows.append(row)
    print("conv_out 96->3 x 4 frames 480x832: " + " | ".join(
        f"{k[3:-3]} out {v:.3f} ms" for k, v in row.items() if k.startswith("out") and k.endswith("_ms")), flush=True)
    save_results(args.out, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
