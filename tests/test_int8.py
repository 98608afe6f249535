"""Int8 weight storage (model/int8.py) and the int8 text encoder (``text_encoder_int8``).

References are independent: quantisation recomputed in float64 with numpy from its definition (groups of 128 input
features, scale = group max / 127, round half to even), and the encoder's float32 output. Tolerances are stated where
they are used."""

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from model.int8 import Int8Embedding, Int8Linear, dequantize_groups, quantize_groups, quantize_int8_
from model.text_encoder import TextEncoder
from tests.test_text_encoder import PROMPTS, TEXT_LEN, hf_model, wan_folder  # noqa: F401 (fixtures)


def _numpy_reference(weight: torch.Tensor, group: int) -> tuple[np.ndarray, np.ndarray]:
    w = weight.double().numpy().reshape(weight.shape[0], -1, group)
    scale = np.maximum(np.abs(w).max(-1) / 127, np.finfo(np.float32).tiny)   # an all-zero group: the smallest
    scale = scale.astype(np.float32).astype(np.float64)                      # stored as float32
    q = np.clip(np.rint(w / scale[..., None]), -127, 127)
    return q.reshape(weight.shape), scale


@pytest.mark.parametrize("width, group", [(256, 128), (96, 96)])   # 96: not a multiple of 128, one group a row
def test_groups_match_a_float64_reference_and_bound_the_error(width, group):
    torch.manual_seed(0)
    w = torch.randn(8, width) * torch.logspace(-2, 1, 8)[:, None]   # rows of very different size
    w[3, :group] = 0                                                 # an all-zero group keeps finite scales
    q, scale = quantize_groups(w)
    ref_q, ref_scale = _numpy_reference(w, group)
    assert q.dtype == torch.int8 and scale.shape == (8, width // group)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_allclose(scale.double().numpy(), ref_scale, rtol=0, atol=0)
    back = dequantize_groups(q, scale, torch.float32)
    step = np.repeat(ref_scale, group, axis=1)
    assert np.all(np.abs(back.double().numpy() - w.double().numpy()) <= step / 2 + 1e-7 * np.abs(w.numpy()))
    assert torch.all(back[3, :group] == 0) and torch.isfinite(scale).all()
    assert (q.view(8, -1, group).abs().amax(-1)[scale > 1e-30] == 127).all()   # each group spans the range


def test_quantising_in_row_chunks_changes_nothing(monkeypatch):
    """Large tables are quantised a few rows at a time (host memory); the chunks, the last one short, give the result
    of one pass."""
    import model.int8 as int8

    w = torch.randn(37, 256)
    whole = quantize_groups(w)
    monkeypatch.setattr(int8, "CHUNK_ELEMENTS", 1000)   # 3 rows a chunk
    chunked = quantize_groups(w)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_int8_linear_and_embedding_compute_with_the_dequantised_weights():
    torch.manual_seed(1)
    linear, table = nn.Linear(256, 40), nn.Embedding(50, 256)
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]])
    x = torch.randn(2, 5, 256)
    q8, e8 = Int8Linear(linear), Int8Embedding(table)
    w = dequantize_groups(q8.weight, q8.weight_scale, torch.float64)
    expected = x.double() @ w.T + linear.bias.double()
    torch.testing.assert_close(q8(x).double(), expected, rtol=1e-5, atol=1e-5)   # float32 products
    rows = dequantize_groups(e8.weight, e8.weight_scale, torch.float32)[ids]
    assert torch.equal(e8(ids), rows)
    # about 0.4% of the weights' scale off (groups of 128 Gaussians: max ~2.7 sigma, step / sqrt(12))
    err = (q8(x) - linear(x)).norm() / linear(x).norm()
    assert 1e-4 < err < 1e-2, err


def test_tied_embeddings_share_one_int8_table_and_unknown_names_are_refused():
    model = nn.Module()
    model.a = nn.Embedding(10, 128)
    model.b = nn.Embedding(10, 128)
    model.b.weight = model.a.weight   # tied, as UMT5's shared and embed_tokens
    model.proj = nn.Linear(128, 4)
    model.again = model.proj          # one layer under two names
    float_layer = weakref.ref(model.proj)
    quantize_int8_(model, embeddings=("a", "b"))
    assert isinstance(model.a, Int8Embedding) and model.a is model.b
    assert isinstance(model.proj, Int8Linear) and model.again is model.proj
    gc.collect()
    assert float_layer() is None   # nothing keeps the float layers once converted (host memory while loading)
    with pytest.raises(ValueError, match="no embedding named c"):
        quantize_int8_(nn.Module(), embeddings=("c",))


def test_int8_text_encoder_is_close_to_float_and_smaller(wan_folder, hf_model):  # noqa: F811
    """The tiny UMT5 (d_model 32: one group a row) loaded with int8=True: every linear layer and the tied token
    embedding int8, the embeddings within 5% (relative, over the real tokens) of the float32 encoder's, padding rows
    still exactly 0, and the streamed (24 GB) mode gives the resident result."""
    ref = TextEncoder.from_pretrained(wan_folder, dtype=torch.float32, text_len=TEXT_LEN, cache_size=0)
    enc = TextEncoder.from_pretrained(wan_folder, dtype=torch.float32, text_len=TEXT_LEN, cache_size=0, int8=True)
    model = enc.encoder
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.shared, Int8Embedding) and model.shared is model.encoder.embed_tokens
    assert enc.dtype == torch.float32
    ref_bytes, int8_bytes = (sum(p.nbytes for p in e.encoder.parameters()) for e in (ref, enc))
    assert int8_bytes < 0.35 * ref_bytes   # float32 -> int8 plus a scale a row (d_model 32)
    out, expected = enc.encode(PROMPTS), ref.encode(PROMPTS)
    _, mask = enc.tokenize(PROMPTS)
    real = mask.bool()
    rel = (out - expected)[real].norm() / expected[real].norm()
    assert 1e-4 < rel < 5e-2, rel
    assert torch.all(out[~real] == 0)
    enc.stream_device = torch.device("cpu")   # each int8 layer swapped in and out like a float one
    assert torch.equal(enc.encode(PROMPTS), out)


def test_the_flag_sets_the_config_key_and_training_refuses_it(tmp_path):
    import inference
    from app.cli import config_from_args
    from tests._dist_worker import ToyObjective, toy_config
    from trainer.loop import Trainer
    from utils.errors import ConfigError

    args = inference.parse_args(["--config_path", "configs/causal_forcing_dmd_chunkwise.yaml", "--data_path",
                                 "p.txt", "--output_folder", "out", "--text_encoder_int8"])
    assert config_from_args(args).text_encoder_int8
    obj = ToyObjective(toy_config(str(tmp_path), max_steps=1))
    obj.cfg.text_encoder_int8 = True
    tf32 = torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ConfigError, match="^text_encoder_int8 is an inference setting"):
        Trainer(obj.cfg, obj).train()
    assert torch.backends.cuda.matmul.allow_tf32 == tf32   # refused before the loop sets anything process-wide
