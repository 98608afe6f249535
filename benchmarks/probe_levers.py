"""Single-kernel probes of candidate speed levers, at the full-size model's shapes (random data, bf16):

* ``ffn``: the FFN's up-projection + tanh-GELU as product-then-GELU (compiled GELU) vs one cuBLASLt call with GELU
  in the epilogue (``torch._addmm_activation``), for a three-frame block and two fused blocks; relative error of
  each against a float64 recomputation.
* ``convout``: the VAE's output convolution (``base_dim`` -> 3 channels, 3x3x3, full resolution, one steady decoder
  call) channels-last, contiguous, and with its output channels zero-padded to 4-32.
* ``vaeattn``: the VAE mid-block attention (one head of the bottleneck width over one latent frame's pixels) as SDPA
  vs explicit matmuls.
* ``host`` (also on a CPU): host time of entering PyTorch's ``sdpa_kernel`` context with our kernel order, which the
  attention entry point once did around every call (now once per pass: ``model.attention.kernel_scope``).

Times are CUDA-event means of 20 calls after 3 warm-up calls. Prints one line per measurement and writes JSON.

    python benchmarks/probe_levers.py ffn convout vaeattn host --out probe_levers.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_ms, save_results, streaming_setup  # noqa: E402
from model import attention as attn  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.vae import WAN21_VAE_CONFIG  # noqa: E402

DT = torch.bfloat16


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ffn(rows: list, cfg, tokens_per_frame: int) -> None:
    for m in (3 * tokens_per_frame, 6 * tokens_per_frame):
        x = torch.randn(m, cfg.dim, device="cuda", dtype=DT)
        w = torch.randn(cfg.ffn_dim, cfg.dim, device="cuda", dtype=DT) / 40
        b = torch.randn(cfg.ffn_dim, device="cuda", dtype=DT) / 10
        ref = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")
        gelu = torch.compile(lambda y: F.gelu(y, approximate="tanh"))
        separate = lambda: gelu(F.linear(x, w, b))  # noqa: E731
        epilogue = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
        row = dict(probe="ffn", tokens=m, separate_ms=cuda_ms(separate), epilogue_ms=cuda_ms(epilogue),
                   linear_alone_ms=cuda_ms(lambda: F.linear(x, w, b)), separate_rel_err=relative(separate(), ref),
                   epilogue_rel_err=relative(epilogue(), ref))
        rows.append(row)
        print(f"FFN up {m} tokens: product+GELU {row['separate_ms']:.3f} ms (product alone "
              f"{row['linear_alone_ms']:.3f}) | GELU epilogue {row['epilogue_ms']:.3f} ms | rel err vs float64 "
              f"{row['separate_rel_err']:.2e} / {row['epilogue_rel_err']:.2e}", flush=True)


def convout(rows: list, channels: int, frames: int, height: int, width: int) -> None:
    x = torch.randn(1, channels, frames + 2, height, width, device="cuda", dtype=DT)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(3, channels, 3, 3, 3, device="cuda", dtype=DT) / 50
    w = w.contiguous(memory_format=torch.channels_last_3d)
    bias = torch.randn(3, device="cuda", dtype=DT)
    ref = F.conv3d(x.double(), w.double(), bias.double(), padding=(0, 1, 1))
    variants = {"channels_last": lambda: F.conv3d(x, w, bias, padding=(0, 1, 1))}
    xc, wc = x.contiguous(), w.contiguous()
    variants["contiguous"] = lambda: F.conv3d(xc, wc, bias, padding=(0, 1, 1))
    for cout in (4, 8, 16, 32):
        wp = torch.zeros(cout, channels, 3, 3, 3, device="cuda", dtype=DT)
        wp[:3] = w
        wp = wp.contiguous(memory_format=torch.channels_last_3d)
        bp = torch.zeros(cout, device="cuda", dtype=DT)
        bp[:3] = bias
        variants[f"padded_to_{cout}"] = lambda wp=wp, bp=bp: F.conv3d(x, wp, bp, padding=(0, 1, 1))[:, :3]
    for name, fn in variants.items():
        row = dict(probe="convout", variant=name, ms=cuda_ms(fn), rel_err=relative(fn(), ref))
        rows.append(row)
        print(f"VAE output conv {channels}->3, {name}: {row['ms']:.3f} ms, rel err {row['rel_err']:.2e}", flush=True)


def vaeattn(rows: list, channels: int, pixels: int) -> None:
    q, k, v = (torch.randn(1, 1, pixels, channels, device="cuda", dtype=DT) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())

    def explicit():
        scores = torch.matmul(q, k.transpose(-1, -2)) * channels**-0.5
        return torch.matmul(scores.float().softmax(-1).to(DT), v)

    for name, fn in (("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)), ("matmuls", explicit)):
        row = dict(probe="vaeattn", variant=name, ms=cuda_ms(fn), rel_err=relative(fn(), ref))
        rows.append(row)
        print(f"VAE mid attention ({pixels} pixels, {channels} ch), {name}: {row['ms']:.3f} ms, rel err "
              f"{row['rel_err']:.2e}", flush=True)


def host(rows: list, calls: int = 2000) -> None:
    start = time.perf_counter()
    for _ in range(calls):
        with attn._sdpa_context("cuda"):  # only sets process flags: measurable without a GPU
            pass
    row = dict(probe="host", sdpa_context_us=(time.perf_counter() - start) / calls * 1e6)
    rows.append(row)
    print(f"host time of entering sdpa_kernel with our order: {row['sdpa_context_us']:.1f} us a call", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probes", nargs="+", choices=["ffn", "convout", "vaeattn", "host"])
    p.add_argument("--out", default="probe_levers.json", help="JSON output path")
    args = p.parse_args(argv)
    rows: list = []
    gpu = [name for name in args.probes if name != "host"]
    setup = streaming_setup(tiny=False) if gpu else None
    if gpu and setup is None:
        print(f"probes {gpu} need a CUDA GPU", file=sys.stderr)
        return 2
    if setup is not None:
        device, _, preset, (_, h, w), vae, _ = setup
        cfg = get_preset(preset)
        scale = vae.spatial_compression
        if "ffn" in args.probes:
            ffn(rows, cfg, (h // cfg.patch_size[1]) * (w // cfg.patch_size[2]))
        if "convout" in args.probes:  # one steady decoder call: one latent frame -> temporal_compression frames
            convout(rows, WAN21_VAE_CONFIG["base_dim"], vae.temporal_compression, h * scale, w * scale)
        if "vaeattn" in args.probes:
            vaeattn(rows, WAN21_VAE_CONFIG["base_dim"] * WAN21_VAE_CONFIG["dim_mult"][-1], h * w)
    if "host" in args.probes:
        host(rows)
    save_results(args.out, rows, setup[0] if setup else torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
