"""Tiny Wan folders: the real file layout of a Wan2.1 download, with tiny random networks.

Tests and the toy world use these so every loader, pipeline and trainer runs the exact code path of the full-size
system: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (DiT), ``models_t5_umt5-xxl-enc-bf16.pth`` (UMT5 in
Wan naming) with a sentencepiece tokenizer trained on the given sentences in ``google/umt5-xxl/``, and the VAE in
diffusers format under ``vae/`` (a tiny VAE's sizes cannot be read from the original ``Wan2.1_VAE.pth`` format).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from model.config import WanConfig
from model.weights import WAN_T5_FILENAME, WAN_TOKENIZER_SUBDIR

TINY_DIT = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=2, text_len=16)
TINY_T5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])

DEFAULT_SENTENCES = [
    f"a {c} {s} moving {d} {v}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")
    for d in ("left", "right", "up", "down") for v in ("slowly", "quickly")
]


def write_tokenizer(folder: Path, sentences: list[str], vocab_size: int = 120) -> Path:
    """Train a unigram sentencepiece model on ``sentences``; save it as a umt5-style tokenizer folder."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "pad_token": "<pad>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    return folder


def write_tiny_wan_folder(folder: str | Path, dit: WanConfig = TINY_DIT, t5: dict | None = None,
                          vae: dict | None = None, sentences: list[str] | None = None, seed: int = 0,
                          dit_state_dict: dict | None = None) -> Path:
    """Write a complete tiny Wan folder at ``folder``; returns its path. Deterministic given ``seed``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, UMT5EncoderModel

    from model.text_encoder import convert_hf_t5_to_wan, umt5_config
    from model.vae import WanVAE
    from model.wan import WanModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # 1. DiT
    dit.to_json(str(folder / "config.json"))
    if dit_state_dict is None:
        model = WanModel(dit)
        with torch.no_grad():  # Wan zero-inits the head; a random tiny model should depend on its input
            model.head.head.weight.normal_(std=0.02)
        dit_state_dict = model.state_dict()
    weights = {k: v.contiguous() for k, v in dit_state_dict.items()}
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    # 2. tokenizer + UMT5 (d_model must equal the DiT's text_dim)
    tok_dir = write_tokenizer(folder / WAN_TOKENIZER_SUBDIR, sentences or DEFAULT_SENTENCES)
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    t5_sizes = dict(TINY_T5, d_model=dit.text_dim, **(t5 or {}))
    encoder = UMT5EncoderModel(umt5_config(vocab_size=vocab, **t5_sizes)).eval()
    torch.save(convert_hf_t5_to_wan(encoder.state_dict()), folder / WAN_T5_FILENAME)
    # 3. VAE (diffusers format)
    WanVAE.from_config(**(vae or TINY_VAE)).model.save_pretrained(str(folder / "vae"))
    return folder
