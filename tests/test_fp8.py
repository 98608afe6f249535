"""fp8 linear layers (model/fp8.py) against independent float64 references.

The product of the fp8 operands is exact in float64 (3-bit mantissas), so a correct row-wise scaled product equals
the float64 product of the dequantised operands up to the bf16 rounding of its output. The quantisation error
itself is bounded by e4m3's precision. How much fp8 moves a whole video is measured on the GPU
(benchmarks/bench_fp8.py), not asserted here.
"""

import pytest
import torch

from model.config import WanConfig
from model.fp8 import E4M3_MAX, Fp8Linear, check_fp8_device, convert_to_fp8, quantize_rows
from model.kv_cache import KVCache
from model.wan import WanModel

CFG = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=2, text_len=16)


def rowwise_on_cpu() -> bool:
    """Whether this torch multiplies row-wise scaled fp8 on the CPU (2.13 does; 2.11 only per-tensor scales)."""
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


CPU_ROWWISE = pytest.mark.skipif(not rowwise_on_cpu(), reason="this torch has no row-wise fp8 product on the CPU")
DEVICES = [pytest.param("cpu", marks=CPU_ROWWISE)] + \
    (["cuda"] if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) else [])


def test_row_quantisation_is_within_e4m3_precision():
    x = torch.randn(64, 96, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((64,), E4M3_MAX))   # each row's max maps to 448
    err = (q.double() * scale.double() - x).abs()
    # 3 mantissa bits: relative 2^-4 for normal values, absolute 2^-10 * scale below e4m3's smallest normal 2^-6
    bound = torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * scale.double()) * (1 + 1e-6)
    assert (err <= bound).all()
    zero_q, zero_scale = quantize_rows(torch.zeros(2, 8))
    assert torch.isfinite(zero_scale).all() and (zero_q.float() == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_linear_equals_the_dequantised_product(device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48).to(device, torch.bfloat16)
    x = torch.randn(3, 40, 96, device=device, dtype=torch.bfloat16)
    fp8 = Fp8Linear(lin.weight, lin.bias)
    out = fp8(x)
    assert out.shape == (3, 40, 48) and out.dtype == torch.bfloat16
    x8, sx = quantize_rows(x.reshape(-1, 96))
    reference = (x8.double() * sx.double()) @ (fp8.weight_fp8.double() * fp8.weight_scale.double().t()).t() \
        + lin.bias.double()
    rel = ((out.reshape(-1, 48).double() - reference).norm() / reference.norm()).item()
    assert rel < 4e-3, f"fp8 product vs dequantised float64 product: {rel:.2e} (bf16 output rounding ~2e-3)"
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    rel_exact = ((out.double() - exact).norm() / exact.norm()).item()
    assert rel_exact < 0.06, f"fp8 vs exact product {rel_exact:.2e} (e4m3 rounding of both operands ~3e-2)"


@CPU_ROWWISE
def test_converted_model_streams_close_to_bf16():
    torch.manual_seed(0)
    model = WanModel(CFG, causal=True, num_frame_per_block=1).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)
    x = torch.randn(1, 2, 16, 4, 6, dtype=torch.bfloat16)
    ctx = torch.randn(1, 8, 32, dtype=torch.bfloat16)
    t = torch.full((1, 1), 700.0)

    def run():
        cache = KVCache.for_model(model, 1, 4, 6, 2)
        with torch.no_grad():
            return torch.cat([model.forward_cached(x[:, f:f + 1], t, ctx, cache, f) for f in range(2)], 1).double()

    reference = run()
    convert_to_fp8(model)
    convert_to_fp8(model)   # idempotent
    block = model.blocks[0]
    assert all(isinstance(m, Fp8Linear) for m in (block.self_attn.fused_qkv, block.self_attn.o, block.cross_attn.q,
                                                   block.cross_attn.o, block.ffn[0], block.ffn[2]))
    assert isinstance(block.cross_attn.k, torch.nn.Linear)   # once per prompt: stays bf16
    rel = ((run() - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.1, f"fp8 vs bf16 model output {rel:.2e}"


def test_fp8_is_refused_without_fp8_tensor_cores():
    with pytest.raises(ValueError, match="compute capability 8.9"):
        check_fp8_device(torch.device("cpu"))
