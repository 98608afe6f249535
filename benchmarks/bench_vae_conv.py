"""The Wan VAE decoder's causal 3x3x3 convolutions at one steady streaming call's shapes (one latent frame in: 1 frame
at 60x104, 2 at 120x208, 4 at 240x416 and 480x832): cuDNN ``conv3d`` channels-last (as the decoder runs them), on
contiguous (NCDHW) tensors, and with the output channels zero-padded to a multiple of 128 (a wider tile for cuDNN;
with ``--benchmark_limit 0``, as the pipeline's fast path sets it, cuDNN finds as fast a kernel for 96). Then the
decoder's last convolution (``conv_out``: 96 channels in, 3 out, four 480x832 frames a call) as it is and computed
with ``--out_pad`` output channels (zero weights, the extra ones dropped), since a 3-wide output is a poor fit for
any GEMM tile.

bf16, cudnn.benchmark on (``--benchmark_limit``: PyTorch's default unless given); CUDA events, mean of ``--iters``
calls after 3 warm-up calls. Prints a table and writes JSON.

    python benchmarks/bench_vae_conv.py --out bench_vae_conv.json [--fp8]
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import torch.nn.functional as F
from common import cuda_ms, rel, save_results

# channels, output frames, height, width, convolutions of this shape per steady call of the full-size decoder
SHAPES = [(96, 4, 480, 832, 6), (192, 4, 240, 416, 6), (384, 2, 120, 208, 5), (384, 1, 60, 104, 10)]
# the up-samplers' 2-D 3x3 convolutions of a steady call: (channels in, out, frames as batch, height, width)
UPSAMPLE_SHAPES = [(192, 96, 4, 480, 832), (384, 192, 4, 240, 416), (384, 192, 2, 120, 208)]
E4M3 = torch.float8_e4m3fn


class CudnnConv:
    """``conv(x, w) * scale + bias`` (float32 accumulation and epilogue, bf16 out) as one cuDNN frontend graph for
    fixed shapes; ``x`` and ``w`` bf16 or e4m3, channels-last. ``scale`` and ``bias`` ``[1, K, 1, ...]`` float32."""

    def __init__(self, cudnn, handle, x, w, padding):
        self.handle = handle
        types = {torch.bfloat16: cudnn.data_type.BFLOAT16, E4M3: cudnn.data_type.FP8_E4M3}
        f32, spatial = cudnn.data_type.FLOAT, x.dim() - 2
        k = w.shape[0]
        g = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=f32, compute_data_type=f32,
                          handle=handle)
        self.x = g.tensor(name="x", dim=list(x.shape), stride=list(x.stride()), data_type=types[x.dtype])
        self.w = g.tensor(name="w", dim=list(w.shape), stride=list(w.stride()), data_type=types[w.dtype])
        per_channel = [1, k] + [1] * spatial
        per_channel_stride = [k, 1] + [k] * spatial
        self.scale = g.tensor(name="scale", dim=per_channel, stride=per_channel_stride, data_type=f32)
        self.bias = g.tensor(name="bias", dim=per_channel, stride=per_channel_stride, data_type=f32)
        y = g.conv_fprop(image=self.x, weight=self.w, padding=list(padding), stride=[1] * spatial,
                         dilation=[1] * spatial, compute_data_type=f32, name="conv")
        y = g.mul(a=y, b=self.scale, compute_data_type=f32, name="descale")
        y = g.add(a=y, b=self.bias, compute_data_type=f32, name="bias")
        out_shape = [x.shape[0], k] + [x.shape[2 + i] + 2 * padding[i] - w.shape[2 + i] + 1 for i in range(spatial)]
        memory = torch.channels_last_3d if spatial == 3 else torch.channels_last
        self.out = torch.empty(out_shape, device=x.device, dtype=torch.bfloat16, memory_format=memory)
        y.set_output(True).set_data_type(cudnn.data_type.BFLOAT16).set_dim(out_shape).set_stride(list(self.out.stride()))
        self.y, self.graph = y, g
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        try:   # every plan, to time them all
            g.build_plans(cudnn.build_plan_policy.ALL)
            self.plans = g.get_execution_plan_count()
            size = max(g.get_workspace_size_plan_at_index(i) for i in range(self.plans))
        except AttributeError:   # a frontend without per-plan calls: its heuristic's choice
            self.plans = None
            g.build_plans()
            size = g.get_workspace_size()
        self.workspace = torch.empty(size, device=x.device, dtype=torch.uint8)
        self.plan = 0

    def __call__(self, x, w, scale, bias) -> torch.Tensor:
        pack = {self.x: x, self.w: w, self.scale: scale, self.bias: bias, self.y: self.out}
        if self.plans is None:
            self.graph.execute(pack, self.workspace, handle=self.handle)
        else:
            self.graph.execute_plan_at_index(pack, self.workspace, self.plan, handle=self.handle)
        return self.out

    def fastest(self, *args, iters: int) -> tuple[float, int]:
        """Time every plan, keep the fastest; returns (its ms, plans that ran)."""
        if self.plans is None:
            return cuda_ms(lambda: self(*args), iters), 1
        times = {}
        for i in range(self.plans):
            self.plan = i
            try:
                times[i] = cuda_ms(lambda: self(*args), iters)
            except Exception:   # a plan that fails at run time is skipped
                continue
        self.plan = min(times, key=times.get)
        return times[self.plan], len(times)


def fp8_rows(args, device) -> list[dict]:
    """The ``--fp8`` rows (module docstring)."""
    try:   # optional, not a dependency
        cudnn = importlib.import_module("cudnn")
        handle = cudnn.create_handle()
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    except Exception as e:
        return [dict(fp8_available=False, error=f"{type(e).__name__}: {e}"[:500])]
    torch.backends.cudnn.allow_tf32 = False   # the float32 reference
    cases = [(c, c, t + 2, h, w, 3) for c, t, h, w, _ in SHAPES] + [(96, 128, 6, 480, 832, 3)]
    cases += [(ci, co, t, h, w, 2) for ci, co, t, h, w in UPSAMPLE_SHAPES]
    rows = []
    for ci, co, t, h, w, spatial in cases:
        torch.manual_seed(0)
        shape = (1, ci, t, h, w) if spatial == 3 else (t, ci, h, w)
        memory = torch.channels_last_3d if spatial == 3 else torch.channels_last
        padding = (0, 1, 1) if spatial == 3 else (1, 1)
        x = F.silu(torch.randn(shape, device=device)).to(torch.bfloat16).contiguous(memory_format=memory)
        wt = (torch.randn(co, ci, *(3,) * spatial, device=device) / (ci * 3 ** spatial) ** 0.5).to(torch.bfloat16)
        wt = wt.contiguous(memory_format=memory)
        bias = torch.randn(co, device=device).mul_(0.1)
        conv = F.conv3d if spatial == 3 else F.conv2d
        exact = conv(x.float(), wt.float(), bias, padding=padding)
        flops = 2 * exact.numel() * ci * 3 ** spatial
        row = dict(spatial=spatial, channels_in=ci, channels_out=co, frames=t, height=h, width=w,
                   gflop=flops / 1e9)
        bf16_out = conv(x, wt, bias.to(torch.bfloat16), padding=padding)
        row["torch_bf16_ms"] = cuda_ms(lambda: conv(x, wt, bias.to(torch.bfloat16), padding=padding), args.iters)
        row["torch_bf16_rel"] = rel(bf16_out, exact)
        # e4m3: the input with one scale (its amax to 448), the weights with one per output channel
        x_scale = x.abs().amax().float() / 448
        x8 = (x.float() / x_scale).to(E4M3).contiguous(memory_format=memory)
        w_scale = wt.abs().flatten(1).amax(1).float() / 448
        w8 = (wt.float() / w_scale.view(-1, *(1,) * (spatial + 1))).to(E4M3).contiguous(memory_format=memory)
        per_channel = (1, co) + (1,) * spatial
        row["cast_input_ms"] = cuda_ms(lambda: (x.float() / x_scale).to(E4M3), args.iters)
        for name, xs, ws, scale in (("cudnn_bf16", x, wt, torch.ones(per_channel, device=device)),
                                    ("cudnn_fp8", x8, w8, (x_scale * w_scale).view(per_channel))):
            try:
                op = CudnnConv(cudnn, handle, xs, ws, padding)
                b = bias.view(per_channel).contiguous()
                scale = scale.contiguous()
                row[f"{name}_ms"], row[f"{name}_plans"] = op.fastest(xs, ws, scale, b, iters=args.iters)
                row[f"{name}_rel"] = rel(op(xs, ws, scale, b), exact)
            except Exception as e:   # an unsupported graph is a result too
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:400]
        for key in ("torch_bf16", "cudnn_bf16", "cudnn_fp8"):
            if f"{key}_ms" in row:
                row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
        rows.append(row)
        print(f"{spatial}-D {ci}->{co} x {t} {h}x{w}: " + " | ".join(
            f"{k} {v:.3g}" for k, v in row.items() if k.endswith(("_ms", "_rel", "_tflops"))), flush=True)
        for k, v in row.items():
            if k.endswith("_error"):
                print(f"  {k}: {v}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--out_pad", type=int, nargs="*", default=[8, 16, 32, 64, 128],
                   help="output-channel counts the 3-channel conv_out is also timed with")
    p.add_argument("--benchmark_limit", type=int, default=None, help="torch.backends.cudnn.benchmark_limit: how many "
                   "of cuDNN's algorithms cudnn.benchmark times per shape (PyTorch's default 10; 0: all)")
    p.add_argument("--fp8", action="store_true", help="also cuDNN's fp8 convolutions (module docstring); needs "
                   "nvidia-cudnn-frontend")
    p.add_argument("--out", default="bench_vae_conv.json", help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.backends.cudnn.benchmark = True
    if args.benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.benchmark_limit
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
    if args.fp8:
        rows += fp8_rows(args, device)
    save_results(args.out, rows, device, benchmark_limit=torch.backends.cudnn.benchmark_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
