"""Tiny Wan folders: the real file layout of a Wan2.1 download, with tiny random networks.

Tests and the toy world use these so every loader, pipeline and trainer runs the exact code path of the full-size
system: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (DiT), ``models_t5_umt5-xxl-enc-bf16.pth`` (UMT5 in
Wan naming) with a sentencepiece tokenizer trained on the given sentences in ``google/umt5-xxl/``, and the VAE in
diffusers format under ``vae/`` (a tiny VAE's sizes cannot be read from the original ``Wan2.1_VAE.pth`` format).

Two families of sizes live here: ``TINY_*`` (test-only, as small as possible) and ``TOY_*`` (the CPU toy world of
issue 9: 64x64 clips of 33 frames -> latents ``[9, 16, 8, 8]``; see docs/CONTRIBUTING.md "The toy world").
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from model.config import WanConfig
from model.text_encoder import WAN_T5_BLOCK_KEYS
from model.weights import WAN_T5_FILENAME, WAN_TOKENIZER_SUBDIR

TINY_DIT = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=2, text_len=16)
TINY_T5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])

# The toy world (64x64 pixels, 33 frames): the DiT sees latents [9, 16, 8, 8] -> 9 x 64 tokens (one per latent pixel)
# of width 256, 4.8M parameters (9.6 MB in bf16). 2x2 patches (16 tokens a frame, each 16x16 pixels, larger than a
# shape's details) drew blobs: shape at chance (docs/toy_results.md).
TOY_DIT = WanConfig(dim=256, ffn_dim=1024, freq_dim=64, text_dim=64, num_heads=4, num_layers=4, text_len=16,
                    in_dim=16, out_dim=16, patch_size=(1, 1, 1))
# Random, frozen UMT5: it only has to map different toy words to different vectors. d_model = TOY_DIT.text_dim.
TOY_T5 = dict(d_model=TOY_DIT.text_dim, d_kv=16, num_heads=4, d_ff=128, num_layers=2)
# Wan2.1's VAE layout (z_dim 16, 8x spatial from the 3 down-sampling stages, 4x temporal from the two temporal
# ones) at width 16 with one residual block per stage: 2.6M parameters. latents_mean/std are set after training.
TOY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)

DEFAULT_SENTENCES = [
    f"a {c} {s} moving {d} {v}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")
    for d in ("left", "right", "up", "down") for v in ("slowly", "quickly")
]


# Characters the toy tokenizer learns as pieces besides its whole words, so any other prompt still tokenizes.
_FALLBACK_CHARACTERS = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789.,;:!?'\"-()"]


def toy_words() -> list[str]:
    """Every word of the synthetic caption grammar (toy/world.py), articles and "moving" included, sorted."""
    from toy.world import SPEED_ADVERBS, VOCABULARY

    words = {w for attr, values in VOCABULARY.items() if attr != "speed" for w in values}
    return sorted(words | set(SPEED_ADVERBS.values()) | {"a", "an", "moving"})


def write_tokenizer(folder: Path, sentences: list[str], vocab_size: int = 120, words: list[str] | None = None) -> Path:
    """Train a unigram sentencepiece model on ``sentences``; save it as a umt5-style tokenizer folder.

    Args:
        words: if given, each of these words is ONE piece (``"▁word"`` user-defined symbols, so the word-initial
            space marker belongs to the piece and raw sentencepiece and the transformers tokenizer agree); single
            characters are learned as well so that other text still tokenizes.
    """
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    extra = {}
    if words:
        extra["user_defined_symbols"] = ["\u2581" + w for w in words]
        # The symbols swallow the whole caption corpus; the character lines keep the trainer's alphabet non-empty.
        sentences = list(sentences) + [" ".join(line) for line in _FALLBACK_CHARACTERS]
        vocab_size = max(vocab_size, len(words) + 3 + sum(len(line) for line in _FALLBACK_CHARACTERS) + 8)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2, **extra)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "pad_token": "<pad>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    return folder


def convert_hf_t5_to_wan(state_dict: dict) -> dict:
    """A ``UMT5EncoderModel`` state dict in Wan's T5 naming, as a Wan folder stores it (the inverse of
    :func:`model.text_encoder.convert_wan_t5_to_hf`): HF's tied embedding is Wan's one ``token_embedding``."""
    hf_to_wan = {hf: wan for wan, hf in WAN_T5_BLOCK_KEYS.items()}
    out = {}
    for key, value in state_dict.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif key.startswith("encoder.block."):
            index, rest = key.removeprefix("encoder.block.").split(".", 1)
            out[f"blocks.{index}.{hf_to_wan[rest]}"] = value
    return out


def _cast(state_dict: dict, dtype: torch.dtype | None) -> dict:
    """Contiguous copies in ``dtype`` (floating tensors only; None keeps each tensor's dtype)."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state_dict.items()}


def write_tiny_wan_folder(folder: str | Path, dit: WanConfig = TINY_DIT, t5: dict | None = None,
                          vae: dict | None = None, sentences: list[str] | None = None, seed: int = 0,
                          dit_state_dict: dict | None = None, words: list[str] | None = None,
                          vae_model=None, weights_dtype: torch.dtype | None = None,
                          vae_dtype: torch.dtype | None = None) -> Path:
    """Write a complete tiny Wan folder at ``folder``; returns its path. Deterministic given ``seed``.

    Args:
        dit, t5, vae: sizes (a WanConfig, UMT5 overrides of ``TINY_T5``, ``AutoencoderKLWan`` arguments).
        sentences: tokenizer training text (``DEFAULT_SENTENCES`` by default).
        dit_state_dict: DiT weights to store instead of a random initialisation.
        words: words that become one tokenizer piece each (see :func:`write_tokenizer`), e.g. :func:`toy_words`.
        vae_model: a (trained) ``AutoencoderKLWan`` to store instead of a random one built from ``vae``.
        weights_dtype: storage dtype of the DiT and text-encoder weights (None: as built, float32); the loaders
            cast to the dtype they are asked for, so bf16 files only halve the size.
        vae_dtype: storage dtype of the VAE weights (None: as built).
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, UMT5EncoderModel

    from model.text_encoder import umt5_config
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
    save_file(_cast(dit_state_dict, weights_dtype), str(folder / "diffusion_pytorch_model.safetensors"))
    # 2. tokenizer + UMT5 (d_model must equal the DiT's text_dim)
    tok_dir = write_tokenizer(folder / WAN_TOKENIZER_SUBDIR, sentences or DEFAULT_SENTENCES, words=words)
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    t5_sizes = {**TINY_T5, "d_model": dit.text_dim, **(t5 or {})}
    encoder = UMT5EncoderModel(umt5_config(vocab_size=vocab, **t5_sizes)).eval()
    torch.save(_cast(convert_hf_t5_to_wan(encoder.state_dict()), weights_dtype), folder / WAN_T5_FILENAME)
    # 3. VAE (diffusers format)
    model = vae_model if vae_model is not None else WanVAE.from_config(**(vae or TINY_VAE)).model
    if vae_dtype is not None:
        import copy

        model = copy.deepcopy(model).to(vae_dtype)  # leave the caller's model in its own dtype
    model.save_pretrained(str(folder / "vae"))
    return folder
