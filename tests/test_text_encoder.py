"""Text encoder: Wan <-> HF key conversion, cleaning, loading from both folder layouts, padded-row zeroing.

Reference: a tiny ``transformers.UMT5EncoderModel`` run directly on the same token ids. Tolerance 1e-6 (fp32, same
kernels; the difference is 0 in practice). The tokenizer is a sentencepiece unigram model trained here on a few
dozen sentences and loaded from a ``google/umt5-xxl``-style folder, as in a real Wan folder.
"""

import io
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.text_encoder import (  # noqa: E402
    UMT5_XXL,
    TextEncoder,
    clean_prompt,
    convert_wan_t5_to_hf,
    expected_wan_t5_keys,
    umt5_config,
    umt5_config_from_wan_state_dict,
)
from model.weights import WAN_T5_FILENAME, WAN_TOKENIZER_SUBDIR  # noqa: E402
from toy.folders import convert_hf_t5_to_wan  # noqa: E402
from utils.errors import CheckpointError, WeightsMissingError  # noqa: E402

TEXT_LEN = 48
PROMPTS = ["a red fox runs across a snowy field at dawn", "two dogs play on the beach"]


def _corpus() -> list[str]:
    subjects = ["a red fox", "two dogs", "an old man", "a small bird", "the city", "a white horse"]
    actions = ["runs across", "plays on", "walks along", "flies over", "glows near", "rests beside"]
    places = ["a snowy field at dawn", "the beach", "a quiet river", "the busy street at night", "green hills"]
    return [f"{s} {a} {p}" for s in subjects for a in actions for p in places][::3]  # 60 sentences


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A Wan-style folder: google/umt5-xxl/{spiece.model,tokenizer_config.json} (the T5 .pth is added later)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-1.3B"
    tokenizer_dir = folder / WAN_TOKENIZER_SUBDIR
    tokenizer_dir.mkdir(parents=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    (tokenizer_dir / "spiece.model").write_bytes(model.getvalue())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "pad_token": "<pad>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    return folder


@pytest.fixture(scope="module")
def hf_model(wan_folder):
    """Tiny random UMT5 encoder (d_model 32, 2 layers, 4 heads), also saved in Wan naming in ``wan_folder``."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    vocab = len(AutoTokenizer.from_pretrained(str(wan_folder / WAN_TOKENIZER_SUBDIR)))
    torch.manual_seed(0)
    config = umt5_config(vocab_size=vocab, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():  # random norm gains, so a norm mapped to the wrong place would show
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
    torch.save(convert_hf_t5_to_wan(model.state_dict()), wan_folder / WAN_T5_FILENAME)
    return model


@pytest.fixture(scope="module")
def encoder(wan_folder, hf_model):
    return TextEncoder.from_pretrained(wan_folder, dtype=torch.float32, text_len=TEXT_LEN, cache_size=0)


def _reference(hf_model, encoder, prompts):
    """HF model output on the encoder's token ids, and the attention mask."""
    ids, mask = encoder.tokenize(prompts)
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def test_clean_prompt():
    assert clean_prompt("  a  cat &amp;amp; a\n\tdog  ") == "a cat & a dog"
    assert clean_prompt("caf\u00c3\u00a9 &lt;b&gt;") == "caf\u00e9 <b>"  # ftfy repairs the mojibake
    assert clean_prompt("plain text") == "plain text"


def test_conversion_is_lossless(hf_model):
    hf_sd = hf_model.state_dict()
    wan_sd = convert_hf_t5_to_wan(hf_sd)
    assert wan_sd.keys() == expected_wan_t5_keys(2)
    back = convert_hf_t5_to_wan(convert_wan_t5_to_hf(wan_sd))
    assert back.keys() == wan_sd.keys()
    assert all(torch.equal(back[k], wan_sd[k]) for k in wan_sd)
    hf_back = convert_wan_t5_to_hf(wan_sd)
    assert hf_back.keys() == hf_sd.keys()
    assert all(torch.equal(hf_back[k], hf_sd[k]) for k in hf_sd)


def test_xxl_preset_matches_wan_t5():
    """UMT5-XXL preset: 5,680,910,336 parameters, 242 Wan keys, sizes recovered from shapes (built on meta)."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config())
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    wan_sd = convert_hf_t5_to_wan(model.state_dict())
    assert len(wan_sd) == 242
    inferred = umt5_config_from_wan_state_dict(wan_sd)
    assert {k: getattr(inferred, k) for k in UMT5_XXL} == UMT5_XXL
    assert inferred.dense_act_fn == "gelu_new" and inferred.is_gated_act


def test_wan_folder_matches_hf_and_zeroes_padding(encoder, hf_model):
    long_prompt = " ".join(_corpus())  # far longer than TEXT_LEN tokens: truncated, EOS kept last
    prompts = PROMPTS + [long_prompt]
    out = encoder.encode(prompts)
    ref, mask = _reference(hf_model, encoder, prompts)
    assert out.shape == (3, TEXT_LEN, 32) and out.dtype == torch.float32 and not out.requires_grad
    real = mask.bool()
    assert (out - ref)[real].abs().max() < 1e-6
    assert torch.all(out[~real] == 0)
    assert 0 < mask[0].sum() < TEXT_LEN and mask[2].sum() == TEXT_LEN
    ids, _ = encoder.tokenize(prompts)
    assert ids[2, -1] == encoder.tokenizer.eos_token_id
    assert (out[0].abs().sum(-1) > 0).sum() == mask[0].sum()  # rows up to and including EOS are non-zero


def test_short_prompts_encode_only_their_columns(encoder, hf_model):
    """A batch of short prompts runs the encoder over the longest one's tokens only; every row still equals the
    encoder's output over all ``text_len`` columns (the reference), padding rows 0, shape ``[B, text_len, D]``."""
    seen = []
    hook = encoder.encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True)
    try:
        out = encoder.encode(PROMPTS)
    finally:
        hook.remove()
    ref, mask = _reference(hf_model, encoder, PROMPTS)
    assert seen == [(2, int(mask.sum(1).max()))] and seen[0][1] < TEXT_LEN, (seen, mask.sum(1))
    assert out.shape == (2, TEXT_LEN, 32)
    real = mask.bool()
    # fewer rows may take another CPU GEMM blocking: float32 rounding apart, no more (values up to ~4)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    assert torch.all(out[~real] == 0)


def test_different_prompts_differ_and_batch_is_consistent(encoder):
    both = encoder.encode(PROMPTS)
    assert not torch.allclose(both[0], both[1])
    single = encoder.encode([PROMPTS[1]])
    assert torch.allclose(single[0], both[1], atol=1e-6)


def test_cache_skips_repeated_prompts(wan_folder, hf_model):
    encoder = TextEncoder.from_pretrained(wan_folder, dtype=torch.float32, text_len=TEXT_LEN, cache_size=2)
    calls = []
    encoder.encoder.register_forward_hook(lambda mod, args, out: calls.append(1))
    first = encoder.encode([PROMPTS[0], PROMPTS[0]])
    again = encoder.encode(PROMPTS[0])
    assert len(calls) == 1 and torch.equal(first[0], again[0]) and torch.equal(first[0], first[1])
    encoder.encode(["a white horse", "green hills"])  # evicts PROMPTS[0] (cache_size 2)
    encoder.encode([PROMPTS[0]])
    assert len(calls) == 3


def test_device_helpers_keep_results(encoder):
    """CPU-only smoke test of streamed; the real device moves are tested on GPU below."""
    expected = encoder.encode(PROMPTS)
    with encoder.streamed("cpu"):
        assert encoder.device == torch.device("cpu")
        streamed = encoder.encode(PROMPTS)
    assert torch.equal(streamed, expected)
    assert all(not hasattr(m, "_host_tensors") for m in encoder.modules())


def test_bf16_load(wan_folder, hf_model):
    encoder = TextEncoder.from_pretrained(wan_folder / WAN_T5_FILENAME, text_len=TEXT_LEN)
    assert encoder.dtype == torch.bfloat16 and encoder.encode(PROMPTS).dtype == torch.bfloat16
    assert encoder.encoder.shared.weight is encoder.encoder.encoder.embed_tokens.weight  # still tied after assign


def test_transformers_folder_loads(tmp_path, wan_folder, hf_model, encoder):
    from transformers import AutoTokenizer

    pipe = tmp_path / "diffusers_pipe"
    hf_model.save_pretrained(pipe / "text_encoder")
    AutoTokenizer.from_pretrained(str(wan_folder / WAN_TOKENIZER_SUBDIR)).save_pretrained(pipe / "tokenizer")
    expected = encoder.encode(PROMPTS)
    for path in (pipe / "text_encoder", pipe):
        loaded = TextEncoder.from_pretrained(path, dtype=torch.float32, text_len=TEXT_LEN)
        assert torch.allclose(loaded.encode(PROMPTS), expected, atol=1e-6, rtol=0)


def test_wrong_key_gives_clear_error(tmp_path, hf_model):
    wan_sd = convert_hf_t5_to_wan(hf_model.state_dict())
    wan_sd["blocks.1.attn.query.weight"] = wan_sd.pop("blocks.1.attn.q.weight")
    folder = tmp_path / "bad"
    folder.mkdir()
    torch.save(wan_sd, folder / WAN_T5_FILENAME)
    with pytest.raises(CheckpointError) as info:
        TextEncoder.from_pretrained(folder, tokenizer_path=tmp_path)
    message = str(info.value)
    assert "blocks.1.attn.q.weight" in message and "blocks.1.attn.query.weight" in message
    assert WAN_T5_FILENAME in message and "\n" not in message


def test_transformers_folder_with_missing_key_gives_clear_error(tmp_path, wan_folder, hf_model):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "text_encoder"
    hf_model.save_pretrained(folder)
    state_dict = load_file(folder / "model.safetensors")
    del state_dict["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): encoder.block.0.layer.1.DenseReluDense.wo.weight$"):
        TextEncoder.from_pretrained(folder, tokenizer_path=wan_folder / WAN_TOKENIZER_SUBDIR)


def test_missing_weights_or_tokenizer(tmp_path, hf_model):
    with pytest.raises(WeightsMissingError, match="no text encoder"):
        TextEncoder.from_pretrained(tmp_path)
    torch.save(convert_hf_t5_to_wan(hf_model.state_dict()), tmp_path / WAN_T5_FILENAME)
    with pytest.raises(WeightsMissingError, match="no tokenizer"):
        TextEncoder.from_pretrained(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_encoder_gpu_output_and_streaming(wan_folder, hf_model, encoder):
    expected = encoder.encode(PROMPTS)
    cpu_to_gpu = TextEncoder.from_pretrained(wan_folder, dtype=torch.float32, text_len=TEXT_LEN,
                                             output_device="cuda", cache_size=0)
    out = cpu_to_gpu.encode(PROMPTS)
    assert out.device.type == "cuda" and torch.equal(out.cpu(), expected)
    assert cpu_to_gpu.device.type == "cpu"
    with cpu_to_gpu.streamed("cuda"):
        streamed = cpu_to_gpu.encode(PROMPTS)
    assert next(cpu_to_gpu.encoder.parameters()).device.type == "cpu"  # weights never left the host
    assert torch.allclose(streamed.cpu(), expected, atol=1e-5, rtol=0)  # GPU kernels: fp32 rounding only


def test_text_encoder_goes_to_the_gpu_only_when_it_fits_beside_a_video(monkeypatch, wan_folder, hf_model):
    """The placement rule of StreamingPipeline.from_config (pipeline/components.py), with the GPU's numbers faked:
    weights + what a video needs against the budget left."""
    from pipeline import components as C

    enc = TextEncoder.from_pretrained(wan_folder, dtype=torch.float32, text_len=TEXT_LEN)
    weights = sum(p.nbytes for p in enc.parameters())
    moved = []
    monkeypatch.setattr(enc.encoder, "to", lambda device: moved.append(device))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)   # generator and VAE
    monkeypatch.setattr(C, "gpu_memory_budget", lambda device: 1000 + weights + 500)
    assert not C.place_text_encoder(enc, torch.device("cuda"), 501) and moved == []
    assert enc.stream_device == torch.device("cuda")   # each new prompt streams the weights there
    enc.stream_device = None
    assert C.place_text_encoder(enc, torch.device("cuda"), 500) and moved == [torch.device("cuda")]
    assert enc.stream_device is None


def test_streamed_text_encoder_gives_the_resident_embeddings(wan_folder, hf_model, encoder):
    """The 24 GB mode's encode (weights streamed layer by layer; here to the CPU itself) equals a resident encode, and
    the weights stay where they were."""
    streamed = TextEncoder.from_pretrained(wan_folder, dtype=torch.float32, text_len=TEXT_LEN)
    streamed.stream_device = torch.device("cpu")
    swaps = []
    block = streamed.encoder.encoder.block[0]   # swapped in while it runs (a hook before the swap-out's)
    block.register_forward_hook(lambda mod, args, out: swaps.append(hasattr(mod, "_host_tensors")))
    assert torch.equal(streamed.encode(PROMPTS), encoder.encode(PROMPTS)) and swaps == [True]


def test_a_full_size_video_under_a_24_gib_cap_streams_the_bf16_text_encoder_and_keeps_the_int8_one():
    """The measured case (H100, 2026-12-07, benchmarks/results/inference_h100_text_encoder_tied.json): a chunk-wise
    480p video with a loaded-size UMT5 resident (10.6 GiB) peaks at 23.0 GiB allocated, 26.0 reserved. The rule must
    stream a loaded bf16 UMT5 (10.6 GiB) under a 24 GiB cap, where the video would run within a GiB of the limit,
    keep it resident on an 80 GiB card, and keep the int8 one (5.4 GiB) resident under the cap, where it ran at a
    peak of 17.4 GiB (inference_h100_cap24_text_encoder_int8.json)."""
    from model.config import get_preset
    from model.int8 import GROUP
    from model.text_encoder import umt5_config
    from pipeline import components as C

    gib = 2**30
    cfg = umt5_config()   # UMT5-XXL's encoder: its parameter count
    embedding = cfg.vocab_size * cfg.d_model
    linear = cfg.num_layers * (4 * cfg.d_model * cfg.d_kv * cfg.num_heads + 3 * cfg.d_model * cfg.d_ff)
    umt5 = 2 * (embedding + linear)                          # bf16 (norms and position biases: < 1 MB)
    umt5_int8 = (embedding + linear) * (1 + 2 / GROUP)       # int8 and a bf16 scale per group
    assert abs(umt5 / gib - 10.58) < 0.01 and abs(umt5_int8 / gib - 5.37) < 0.01   # as measured on loaded encoders
    weights = int(2.9 * gib)   # the 1.3B generator and the Wan VAE in bf16
    working = C.video_working_bytes(get_preset("wan2.1-t2v-1.3b"), (16, 60, 104), 21, 2, weights)
    measured_allocated = (23.0 - 10.6 - 2.9) * gib          # the peak minus UMT5 and the networks
    assert measured_allocated < working < measured_allocated + 2 * gib   # the rule: above the peak, by < 2 GiB
    assert umt5 + working > 24 * gib - weights       # under the cap: streamed
    assert umt5 + working < 80 * gib - weights       # on an 80 GiB card: resident
    assert umt5_int8 + working < 24 * gib - weights  # int8 under the cap: resident
