"""fp8 convolutions of the VAE decoder (model/fp8_conv.py, ``WanVAE.decoder_to_fp8``).

On the CPU: the weight quantisation against e4m3's precision, the decoder's fp8 path (the op's float32 reference
kernel) against the float decoder, streaming against whole-video decoding, the conversion's bookkeeping. On a GPU
with fp8 tensor cores and the cuDNN frontend: cuDNN's kernel against that reference on the same e4m3 operands, and
the compiled decoder against the eager one. How much fp8 moves a full-size video, and its speed, are measured by
benchmarks (docs/performance.md), not asserted here."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model.fp8_conv import E4M3, E4M3_MAX, check_fp8_conv_device, fp8_conv, quantize_conv_weight, to_e4m3
from model.vae import TINY_VAE_CONFIG, WanVAE
from utils.errors import ConfigError

CUDNN_FP8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
         and importlib.util.find_spec("cudnn") is not None),
    reason="needs a GPU with fp8 tensor cores and nvidia-cudnn-frontend")


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_vae(seed=0) -> WanVAE:
    torch.manual_seed(seed)
    return WanVAE.from_config(**TINY_VAE_CONFIG).float()


def test_weight_quantisation_is_within_e4m3_precision():
    w = torch.randn(12, 8, 3, 3, 3, dtype=torch.float64) * torch.logspace(-3, 2, 12, dtype=torch.float64).view(
        -1, 1, 1, 1, 1)
    w8, scale = quantize_conv_weight(w, out_channels=16)
    assert w8.dtype == E4M3 and w8.shape == (16, 8, 3, 3, 3) and scale.shape == (1, 16, 1, 1, 1)
    assert w8.is_contiguous(memory_format=torch.channels_last_3d)
    # each output channel's largest weight maps to 448; the padding rows are zero with a finite scale
    assert torch.equal(w8[:12].float().abs().flatten(1).amax(1), torch.full((12,), E4M3_MAX))
    assert (w8[12:].float() == 0).all() and torch.isfinite(scale).all()
    s = scale.view(-1)[:12].double().view(-1, 1, 1, 1, 1)
    err = (w8[:12].double() * s - w).abs()
    # 3 mantissa bits: relative 2^-4 for normal values, absolute 2^-10 * scale below the smallest normal 2^-6
    bound = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * s) * (1 + 1e-6)
    assert (err <= bound).all()


def test_input_cast_saturates_instead_of_overflowing():
    x = torch.tensor([0.0, 1.0, -3.3, 500.0, -1e4])
    assert to_e4m3(x).float().tolist() == [0.0, 1.0, -3.25, 448.0, -448.0]


def test_fp8_decoder_streams_close_to_the_float_decoder():
    vae = tiny_vae()
    z = torch.randn(1, 6, 16, 8, 8)
    reference = vae.decode(z)
    state = {k: v.clone() for k, v in vae.model.state_dict().items()}
    vae.decoder_to_fp8()
    vae.decoder_to_fp8()   # idempotent
    converted = [m for m in vae.model.decoder.modules() if hasattr(m, "fp8_weight")]
    resnets = [b for b in vae.model.decoder.modules() if hasattr(b, "conv1") and hasattr(b, "norm2")]
    assert len(converted) == 2 * len(resnets) > 0
    assert not any(hasattr(m, "fp8_weight") for m in vae.model.encoder.modules())
    assert not hasattr(vae.model.decoder.conv_out, "fp8_weight")   # the head: 3 output channels, no norm-fed input
    assert vae.model.state_dict().keys() == state.keys()   # the e4m3 copies are not checkpoint keys
    out = vae.decode(z)
    assert torch.equal(out[:, :1], reference[:, :1])   # a video's first call stays in float
    error = rel(out, reference)
    # e4m3 rounds each operand by up to 2^-4: a few percent per convolution, compounding over the decoder's 30
    assert 0.01 < error < 0.3, f"fp8 decoder vs float decoder: {error:.3f}"
    # streaming keeps the e4m3 cache: two chunks give the whole video's frames
    stream = vae.stream()
    parts = torch.cat([stream.decode_chunk(z[:, :2]), stream.decode_chunk(z[:, 2:])], dim=1)
    assert torch.equal(parts, out)


def test_fp8_vae_is_refused_in_one_line_where_it_cannot_run():
    with pytest.raises(ConfigError, match=r"^--fp8_vae: fp8 needs a CUDA GPU of compute capability 8\.9") as e:
        check_fp8_conv_device(torch.device("cpu"))
    assert "\n" not in str(e.value)


@CUDNN_FP8
@pytest.mark.parametrize("shape,channels_out", [((1, 64, 4, 24, 40), 64), ((1, 32, 6, 16, 16), 48),
                                                ((3, 64, 20, 36), 32)])
def test_cudnn_kernel_equals_the_reference_on_the_same_operands(shape, channels_out):
    torch.manual_seed(0)
    spatial = len(shape) - 2
    memory = torch.channels_last_3d if spatial == 3 else torch.channels_last
    padding = [0, 1, 1] if spatial == 3 else [1, 1]
    x = to_e4m3(F.silu(torch.randn(shape, device="cuda"))).contiguous(memory_format=memory)
    w8, scale = quantize_conv_weight(torch.randn(channels_out, shape[1], *(3,) * spatial, device="cuda"))
    bias = torch.randn(scale.shape, device="cuda")
    got = fp8_conv(x, w8, scale, bias, padding)
    conv = F.conv3d if spatial == 3 else F.conv2d
    # float64 products of the e4m3 operands are exact: only the float32 sums and the bf16 output round
    reference = conv(x.double(), w8.double(), padding=padding) * scale.double() + bias.double()
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=memory)
    assert rel(got, reference) < 4e-3   # bf16 output rounding ~2e-3
    fake = torch.library.opcheck(torch.ops.causal_forcing.fp8_conv.default, (x, w8, scale, bias, padding))
    assert all(v == "SUCCESS" for v in fake.values()), fake


@CUDNN_FP8
def test_compiled_fp8_decoder_equals_the_eager_one_on_the_gpu():
    vae = tiny_vae()
    vae.model.to("cuda", torch.bfloat16)
    vae.to_channels_last().decoder_to_fp8()
    z = torch.randn(1, 6, 16, 8, 8, device="cuda")
    eager = vae.decode(z)
    compiled = copy.copy(vae).compile_decoder()
    assert rel(compiled.decode(z), eager) < 2e-2   # inductor's fused norms round differently from eager's
    float_vae = tiny_vae()
    reference = float_vae.decode(z.cpu())
    assert rel(eager.cpu(), reference) < 0.3
