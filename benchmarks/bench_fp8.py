"""How far fp8 moves the generator from bf16, with bf16's own distance to float32 as the yardstick; and the kernels'
speed. Full-size Wan2.1-1.3B generator with random weights (head drawn too: Wan zero-initialises it), random text
embeddings; GPU only.

1. Per layer: the inputs every converted linear layer sees in one bf16 forward of a three-frame block; for each, the
   relative error of its bf16 and its fp8 output against the float32 product of the float32 weights (median and max
   over the 30 blocks).
2. Whole video: an 81-frame chunk-wise 4-step video generated in float32, bf16 and bf16 + fp8 (same seed and noise),
   eager; the latents' relative error, and the PSNR of their decodes (float32 Wan VAE, random weights) against
   each other.
3. Kernels: fp8 row-wise products against bf16 ones at the block's shapes, and 8-bit attention (SageAttention;
   cuDNN's fp8 flash attention through the cuDNN frontend; each when its package is installed) against SDPA's cuDNN
   kernel, with its error against float32 attention.

    python benchmarks/bench_fp8.py --out fp8.json [--parts layers kernels sage_attention cudnn_fp8_attention video]
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from common import cuda_ms, rel, save_results

from model.attention import attention
from model.config import get_preset
from model.fp8 import Fp8Linear, convert_to_fp8, quantize_rows
from model.loader import build_wan_model
from model.scheduler import FlowMatchScheduler
from model.vae import WAN21_VAE_CONFIG, WanVAE
from model.wan import WanModel
from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline

PRESET, LATENT, FRAMES = "wan2.1-t2v-1.3b", (16, 60, 104), 21
# attention calls of streaming, in latent frames (queries, keys): one frame and one chunk against a full cache, a
# chunk against two chunks' cache
STREAM_FRAMES = ((1, FRAMES), (3, FRAMES), (3, 6))
GEMM_FRAMES = (1, 2, 3, 6)   # latent frames of tokens through a block's linear layers (a frame, a chunk, two chunks)


def stream_attention_inputs(device):
    """bf16 ``(q, k, v)`` ``[1, L, heads, head_dim]`` of the preset at each :data:`STREAM_FRAMES` pair, with its
    name ``"<queries>x<keys>"`` (tokens)."""
    cfg = get_preset(PRESET)
    per_frame = cfg.tokens_per_frame(*LATENT[1:])
    for fq, fk in STREAM_FRAMES:
        lq, lk = fq * per_frame, fk * per_frame
        yield f"{lq}x{lk}", tuple(torch.randn(1, n, cfg.num_heads, cfg.head_dim, device=device, dtype=torch.bfloat16)
                                  for n in (lq, lk, lk))
LAYERS = {"qkv": ("self_attn.q", "self_attn.k", "self_attn.v"), "self_o": ("self_attn.o",),
          "cross_q": ("cross_attn.q",), "cross_o": ("cross_attn.o",), "ffn_up": ("ffn.0",), "ffn_down": ("ffn.2",)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pixels in [-1, 1] (peak-to-peak 2)."""
    mse = (a.double().clamp(-1, 1) - b.double().clamp(-1, 1)).pow(2).mean().item()
    return 10 * math.log10(4 / mse) if mse > 0 else float("inf")


def build(device) -> tuple[WanModel, WanModel]:
    """The float32 generator and its bf16 copy."""
    torch.manual_seed(0)
    gen32 = build_wan_model(PRESET, causal=True, dtype=torch.float32, device=device).eval()
    with torch.no_grad():
        gen32.head.head.weight.normal_(std=0.02)
    gen16 = build_wan_model(PRESET, causal=True, dtype=torch.bfloat16, device=device).eval()
    gen16.load_state_dict(gen32.state_dict())
    return gen32, gen16


def layer_errors(gen32: WanModel, gen16: WanModel, ctx: torch.Tensor) -> dict:
    """Per-layer relative errors (section 1 of the module docstring)."""
    device = ctx.device
    bidir = WanModel(gen16.config, causal=False).to(device, torch.bfloat16).eval()   # plain SDPA, same weights
    bidir.load_state_dict(gen16.state_dict())
    errors = defaultdict(lambda: defaultdict(list))
    names = {name: kind for kind, names in LAYERS.items() for name in names}

    def hook(kind, lin16, lin32):
        def fn(module, args):
            x = args[0]
            exact = F.linear(x.float(), lin32.weight, lin32.bias)
            errors[kind]["bf16"].append(rel(F.linear(x, lin16.weight, lin16.bias), exact))
            fp8 = Fp8Linear(lin16.weight, lin16.bias)(x)
            errors[kind]["fp8"].append(rel(fp8, exact))
            errors[kind]["fp8_vs_bf16"].append(rel(fp8, F.linear(x, lin16.weight, lin16.bias)))
        return fn

    handles = []
    for i, block in enumerate(bidir.blocks):
        for name, kind in names.items():
            lin16, lin32 = block.get_submodule(name), gen32.blocks[i].get_submodule(name)
            handles.append(lin16.register_forward_pre_hook(hook(kind, lin16, lin32)))
    x = torch.randn(1, 3, *LATENT, device=device, dtype=torch.bfloat16)
    with torch.enable_grad():   # nothing requires gradients; this keeps the FFN on its module path (hooks fire)
        bidir(x, torch.full((1,), 500.0, device=device), ctx)
    for h in handles:
        h.remove()
    return {kind: {k: dict(median=statistics.median(v), max=max(v)) for k, v in d.items()}
            for kind, d in errors.items()}


def video(gen: WanModel, dtype, ctx: torch.Tensor) -> torch.Tensor:
    sch = FlowMatchScheduler(shift=5.0)
    pipe = StreamingPipeline(gen, None, None, sch, StepSchedule.from_config(sch, [1000, 750, 500, 250]),
                             latent_shape=LATENT, device=ctx.device, dtype=dtype)
    pipe.enable_fast_path(compile=False)   # eager: the same kernels for every precision's products
    stream = pipe.open("fp8", num_latent_frames=FRAMES, seed=0, decode=False, context=ctx.to(dtype))
    return torch.cat([c.latents for c in stream], 1).float()


def video_errors(gen32: WanModel, gen16: WanModel, ctx: torch.Tensor) -> dict:
    lat32 = video(gen32, torch.float32, ctx)
    lat16 = video(gen16, torch.bfloat16, ctx)
    convert_to_fp8(gen16)
    lat8 = video(gen16, torch.bfloat16, ctx)
    vae = WanVAE.from_config(**WAN21_VAE_CONFIG).to(ctx.device).eval()
    with torch.no_grad():
        pix = {name: vae.decode(lat, frames_per_call=1).float().cpu()
               for name, lat in (("fp32", lat32), ("bf16", lat16), ("fp8", lat8))}
    g = torch.Generator(device=ctx.device).manual_seed(1)
    noise_equal = torch.equal(torch.randn(1000, generator=g, device=ctx.device, dtype=torch.bfloat16),
                              torch.randn(1000, generator=g.manual_seed(1), device=ctx.device).bfloat16())
    return dict(latent_rel=dict(bf16_vs_fp32=rel(lat16, lat32), fp8_vs_fp32=rel(lat8, lat32),
                                fp8_vs_bf16=rel(lat8, lat16)),
                psnr_db=dict(bf16_vs_fp32=psnr(pix["bf16"], pix["fp32"]), fp8_vs_fp32=psnr(pix["fp8"], pix["fp32"]),
                             fp8_vs_bf16=psnr(pix["fp8"], pix["bf16"])),
                pixel_frames=pix["fp32"].shape[1], same_noise_in_bf16_and_fp32=noise_equal)


def kernel_speeds(device) -> dict:
    cfg = get_preset(PRESET)
    out = {}
    per_frame = cfg.tokens_per_frame(*LATENT[1:])
    for tokens in (n * per_frame for n in GEMM_FRAMES):
        for name, (k, n) in dict(qkv=(cfg.dim, 3 * cfg.dim), o=(cfg.dim, cfg.dim), ffn_up=(cfg.dim, cfg.ffn_dim),
                                 ffn_down=(cfg.ffn_dim, cfg.dim)).items():
            lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
            x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
            fp8 = Fp8Linear(lin.weight, lin.bias)
            with torch.no_grad():
                bf16_ms, fp8_ms = cuda_ms(lambda: lin(x)), cuda_ms(lambda: fp8(x))
                x8, sx = quantize_rows(x)   # the product alone: inside the compiled regions the quantisation is fused
                fp8_ms_gemm = cuda_ms(lambda: torch._scaled_mm(x8, fp8.weight_fp8.t(), scale_a=sx,
                                                               scale_b=fp8.weight_scale, bias=fp8.bias,
                                                               out_dtype=torch.bfloat16))
            out[f"{name}_{tokens}"] = dict(bf16_ms=bf16_ms, fp8_eager_ms=fp8_ms, fp8_gemm_only_ms=fp8_ms_gemm,
                                           gemm_speedup=bf16_ms / fp8_ms_gemm)
    return out


def sage_attention(device) -> dict:
    """SageAttention 1 (INT8 Q·K, fp16 P·V; Triton) against SDPA (cuDNN first) at the streaming shapes."""
    try:   # optional, not a dependency: pip install sageattention==1.0.6 (Triton kernels, no build)
        sageattn = importlib.import_module("sageattention").sageattn
    except ImportError as e:
        return dict(available=False, error=str(e))
    out = {}
    for name, (q, k, v) in stream_attention_inputs(device):
        try:
            sage = sageattn(q, k, v, tensor_layout="NHD")
            sage_ms = cuda_ms(lambda: sageattn(q, k, v, tensor_layout="NHD"))
        except Exception as e:   # a kernel that does not build or run here is a result too
            return dict(available=True, error=f"{type(e).__name__}: {e}"[:500])
        exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        sdpa = attention(q, k, v)
        out[name] = dict(sdpa_ms=cuda_ms(lambda: attention(q, k, v)), sage_ms=sage_ms,
                                 sdpa_rel=rel(sdpa, exact), sage_rel=rel(sage, exact))
    return dict(available=True, shapes=out)


def _per_tensor_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as e4m3 with one float32 scale for the whole tensor (``x ≈ x8 · scale``), scale shaped [1, 1, 1, 1]."""
    scale = (x.abs().amax().float() / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.reshape(1, 1, 1, 1)


def cudnn_fp8_attention(device) -> dict:
    """cuDNN's fp8 flash attention (per-tensor scaled e4m3 Q, K, V and output, through the cuDNN frontend) against
    SDPA's bf16 cuDNN kernel at the streaming shapes: the kernel alone, with Q quantised per call (K and V as a cache
    would hold them, quantised once when written) and with all three quantised per call; errors against float32."""
    try:   # optional, not a dependency: pip install nvidia-cudnn-frontend
        cudnn = importlib.import_module("cudnn")
        handle = cudnn.create_handle()
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    except Exception as e:
        return dict(available=False, error=f"{type(e).__name__}: {e}"[:500])
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    out = dict(available=True, cudnn_backend=int(cudnn.backend_version()))
    for shape, (q, k, v) in stream_attention_inputs(device):
        (b, lq, h, d), lk = q.shape, k.shape[1]
        try:
            graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

            def layout(name: str, n: int):   # our [B, L, N, d] memory as cuDNN's (b, h, s, d) dims
                return graph.tensor(name=name, dim=(b, h, n, d), stride=(n * h * d, d, h * d, 1), data_type=e4m3)

            tq, tk, tv = layout("q", lq), layout("k", lk), layout("v", lk)
            scalars = {name: graph.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
                       for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
            common = dict(q=tq, k=tk, v=tv, **scalars, attn_scale=1.0 / math.sqrt(d), name="sdpa_fp8")
            try:   # newer frontends name the flag generate_stats, older ones is_inference
                to, _, amax_s, amax_o = graph.sdpa_fp8(**common, generate_stats=False)
            except TypeError:
                to, _, amax_s, amax_o = graph.sdpa_fp8(**common, is_inference=True)
            to.set_output(True).set_dim((b, h, lq, d)).set_stride((lq * h * d, d, h * d, 1)).set_data_type(e4m3)
            amax_s.set_output(False).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
            amax_o.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
            (q8, dq), (k8, dk), (v8, dv) = (_per_tensor_e4m3(t) for t in (q, k, v))
            one = torch.ones(1, 1, 1, 1, device=device)
            o8, amax_o_buf = torch.empty_like(q8), torch.empty(1, 1, 1, 1, device=device)
            # probabilities lie in [0, 1]: S is stored times 448; |O| <= max |V|, so O is stored as O / dv
            pack = {tq: q8, tk: k8, tv: v8, scalars["descale_q"]: dq, scalars["descale_k"]: dk,
                    scalars["descale_v"]: dv, scalars["descale_s"]: one / fp8_max, scalars["scale_s"]: one * fp8_max,
                    scalars["scale_o"]: 1.0 / dv, to: o8, amax_o: amax_o_buf}

            def run():
                graph.execute(pack, workspace, handle=handle)

            def run_quantising_q():
                pack[tq], pack[scalars["descale_q"]] = _per_tensor_e4m3(q)
                run()

            def run_quantising_all():
                for t, src, name in ((tq, q, "descale_q"), (tk, k, "descale_k"), (tv, v, "descale_v")):
                    pack[t], pack[scalars[name]] = _per_tensor_e4m3(src)
                run()

            run()
            torch.cuda.synchronize()
            fp8 = o8.float() * dv
            exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            sdpa = attention(q, k, v)
            out[shape] = dict(sdpa_ms=cuda_ms(lambda: attention(q, k, v)), fp8_ms=cuda_ms(run),
                                     fp8_quantising_q_ms=cuda_ms(run_quantising_q),
                                     fp8_quantising_qkv_ms=cuda_ms(run_quantising_all),
                                     sdpa_rel=rel(sdpa, exact), fp8_rel=rel(fp8, exact))
        except Exception as e:   # a graph the installed cuDNN does not support is a result too
            out[shape] = dict(error=f"{type(e).__name__}: {e}"[:500])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_fp8.json", help="JSON output path")
    parts = ("layers", "kernels", "sage_attention", "cudnn_fp8_attention", "video")
    p.add_argument("--parts", nargs="+", default=list(parts), choices=parts,
                   help="sections to run, in this order (default: all; the video part alone takes minutes)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False   # the float32 reference is float32
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_preset(PRESET)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    gen32, gen16 = build(device) if {"layers", "video"} & set(args.parts) else (None, None)
    result = {}
    steps = (("layers", lambda: layer_errors(gen32, gen16, ctx.bfloat16())),
             ("kernels", lambda: kernel_speeds(device)), ("sage_attention", lambda: sage_attention(device)),
             ("cudnn_fp8_attention", lambda: cudnn_fp8_attention(device)),
             ("video", lambda: video_errors(gen32, gen16, ctx)))   # the long one last
    for name, step in steps:   # saved section by section
        if name not in args.parts:
            continue
        result[name] = step()
        print(name, result[name], flush=True)
        save_results(args.out, [result], device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
