"""UMT5-XXL text encoder of Wan2.1 over ``transformers.UMT5EncoderModel``: Wan <-> HF key conversion, Wan's prompt
cleaning, a fixed ``text_len`` with padded rows zeroed, loading from a Wan or transformers/diffusers folder
(model_and_inference.md §6.2, §7.3)."""

from __future__ import annotations

import contextlib
import html
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.int8 import quantize_int8_
from model.weights import WAN_T5_FILENAME, WAN_TOKENIZER_FILES, WAN_TOKENIZER_SUBDIR, wan_download_hint
from utils.errors import CheckpointError, WeightsMissingError, key_mismatch, one_line

logger = logging.getLogger(__name__)

# Per-block key suffixes: Wan name -> HF name (under ``encoder.block.{i}.``). The FFN is
# ``fc2(fc1(x) * gelu_tanh(gate(x)))`` in Wan and ``wo(gelu_new(wi_0(x)) * wi_1(x))`` in HF, hence gate <-> wi_0.
WAN_T5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    **{f"attn.{p}.weight": f"layer.0.SelfAttention.{p}.weight" for p in "qkvo"},
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# UMT5-XXL as built by Wan's ``umt5_xxl(encoder_only=True)``; 5,680,910,336 parameters.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                relative_attention_num_buckets=32, relative_attention_max_distance=128)


def _num_wan_layers(state_dict: dict) -> int:
    indices = [int(m.group(1)) for k in state_dict if (m := _WAN_BLOCK_RE.match(k))]
    return max(indices) + 1 if indices else 0


def expected_wan_t5_keys(num_layers: int) -> set[str]:
    """The exact key set of a Wan T5 encoder checkpoint with ``num_layers`` blocks (242 keys for 24 layers)."""
    keys = {"token_embedding.weight", "norm.weight"}
    keys.update(f"blocks.{i}.{suffix}" for i in range(num_layers) for suffix in WAN_T5_BLOCK_KEYS)
    return keys


def convert_wan_t5_to_hf(state_dict: dict) -> dict:
    """Wan T5 encoder keys -> ``UMT5EncoderModel`` keys, tensors shared; ``token_embedding.weight`` becomes both of
    HF's tied ``shared.weight`` and ``encoder.embed_tokens.weight``."""
    embedding = state_dict["token_embedding.weight"]
    out = {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding,
           "encoder.final_layer_norm.weight": state_dict["norm.weight"]}
    for key, value in state_dict.items():
        if m := _WAN_BLOCK_RE.match(key):
            out[f"encoder.block.{m.group(1)}.{WAN_T5_BLOCK_KEYS[m.group(2)]}"] = value
    return out


def umt5_config(**overrides):
    """A ``UMT5Config`` for the Wan text encoder (gated tanh-GELU FFN, eps 1e-6): UMT5-XXL sizes unless overridden.
    Dropout 0: Wan's 0.1 is inactive in eval, and a stray ``.train()`` must not change a frozen encoder's output."""
    from transformers import UMT5Config

    kwargs = dict(UMT5_XXL, feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    kwargs.update(overrides)
    return UMT5Config(**kwargs)


def umt5_config_from_wan_state_dict(state_dict: dict, source: str = "checkpoint"):
    """The ``UMT5Config`` read from a Wan T5 state dict's shapes (CheckpointError unless its keys are exactly a Wan
    T5 encoder's); the maximum relative distance is not stored (Wan: 128)."""
    expected = expected_wan_t5_keys(_num_wan_layers(state_dict))
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise CheckpointError(f"{source} is not a Wan UMT5 encoder state dict: {key_mismatch(missing, unexpected)}")
    vocab_size, d_model = state_dict["token_embedding.weight"].shape
    num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    inner_dim = state_dict["blocks.0.attn.q.weight"].shape[0]
    if inner_dim % num_heads:
        raise CheckpointError(f"attention width {inner_dim} is not a multiple of the {num_heads} heads")
    return umt5_config(vocab_size=vocab_size, d_model=d_model, d_kv=inner_dim // num_heads, num_heads=num_heads,
                       d_ff=state_dict["blocks.0.ffn.fc1.weight"].shape[0], num_layers=_num_wan_layers(state_dict),
                       relative_attention_num_buckets=num_buckets)


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: repair mojibake (ftfy), unescape HTML twice, collapse whitespace, strip."""
    import ftfy  # Wan's cleaning depends on it; imported here so the rest of the module works without it

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in WAN_TOKENIZER_FILES)


def load_tokenizer(path: str | Path):
    """Load a tokenizer from a local folder (never by vocab-file argument: transformers 5 ignores it silently)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not _has_tokenizer(path):
        raise WeightsMissingError(f"no tokenizer in {path} (expected one of {', '.join(WAN_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ImportError, ValueError) as e:   # e.g. no protobuf: transformers then takes spiece.model for tiktoken
        raise WeightsMissingError(f"cannot read the tokenizer in {path} ({one_line(e)}); reinstall the project's "
                                  "dependencies: pip install -e . (protobuf, sentencepiece)") from e
    tokenizer.padding_side = "right"  # padded rows are zeroed by the attention mask, wherever they are
    return tokenizer


def _load_wan_state_dict(path: Path) -> dict:
    """torch.load the Wan .pth with weights_only; mmap keeps the 11 GB file out of RAM until used."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    return state_dict


def umt5_from_wan_state_dict(state_dict: dict, dtype: torch.dtype = torch.bfloat16, source: str = "checkpoint"):
    """A ``UMT5EncoderModel`` built on ``meta`` that takes the checkpoint's tensors (no random init, no copy)."""
    from transformers import UMT5EncoderModel

    config = umt5_config_from_wan_state_dict(state_dict, source)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    hf_state_dict = convert_wan_t5_to_hf(state_dict)
    try:
        model.load_state_dict(hf_state_dict, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatch between layers
        raise CheckpointError(f"{source} does not fit UMT5 ({str(err).splitlines()[-1].strip()})") from err
    model.tie_weights()  # assign=True replaced the tied Parameter objects; share the embedding again
    return model.to(dtype)


def _load_hf_encoder(folder: Path, dtype: torch.dtype):
    """``UMT5EncoderModel.from_pretrained`` on a local folder, failing on any missing/unexpected/mismatched key."""
    from transformers import UMT5EncoderModel

    try:
        model, info = UMT5EncoderModel.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as err:  # unreadable files, shapes that contradict config.json
        raise CheckpointError(f"cannot load UMT5 encoder from {folder}: {one_line(err)}") from err
    # The tied embedding may be stored once; the decoder half of a full UMT5 checkpoint is legitimately unused.
    missing = [k for k in info.get("missing_keys", ()) if k not in ("encoder.embed_tokens.weight", "shared.weight")]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith(("decoder.", "lm_head."))]
    mismatched = [str(m) for m in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{folder} does not fit UMT5: {key_mismatch(missing, unexpected, mismatched)}")
    return model


def _find_tokenizer(weights: Path, explicit: str | Path | None) -> Path:
    """The tokenizer folder: explicit, else Wan's ``google/umt5-xxl`` / diffusers' ``../tokenizer`` / the folder."""
    if explicit is not None:
        return Path(explicit)
    base = weights if weights.is_dir() else weights.parent
    candidates = [base / WAN_TOKENIZER_SUBDIR, base.parent / "tokenizer", base / "tokenizer", base]
    for candidate in candidates:
        if _has_tokenizer(candidate):
            return candidate
    raise WeightsMissingError(f"no tokenizer found next to {weights} (looked in "
                              f"{', '.join(str(c) for c in candidates)}); pass tokenizer_path")


class TextEncoder(nn.Module):
    """Frozen UMT5 encoder + tokenizer: prompts -> ``[B, text_len, d_model]`` (512 for Wan, EOS included) with
    padded rows zero, returned on ``output_device`` (None: where the encoder runs); the last ``cache_size`` prompts'
    embeddings are kept (0: none)."""

    def __init__(self, encoder: nn.Module, tokenizer, text_len: int = 512,
                 output_device: torch.device | str | None = None, cache_size: int = 8):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, torch.dtype], torch.Tensor] = OrderedDict()
        self._stream_device: torch.device | None = None
        self.stream_device: torch.device | None = None   # set: every encode streams the weights there (24 GB mode)

    @property
    def device(self) -> torch.device:
        """Where the encoder computes: the streaming device if :meth:`streamed` is active, else its weights'."""
        return self._stream_device or next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (int8-stored weights compute in their scales' dtype)."""
        return next(p.dtype for p in self.encoder.parameters() if p.is_floating_point())

    def train(self, mode: bool = True) -> "TextEncoder":
        """The encoder is frozen: it stays in eval mode whatever the caller asks."""
        super().train(mode)
        self.encoder.eval()
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenise: returns ids and attention mask, both ``[B, text_len]`` int64 on the CPU."""
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                               max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> torch.Tensor:
        """Encode without the cache: ``[B, text_len, d_model]`` in the encoder dtype on :attr:`device`."""
        if self.stream_device is not None and self._stream_device is None:   # weights stay put, layers visit
            with self.streamed(self.stream_device):
                return self._run(prompts)
        ids, mask = self.tokenize(prompts)
        # Only the columns up to the longest prompt's last token are encoded: the mask keeps every real token from
        # attending to padding, so they come out as with all text_len columns (a short prompt: 1/10 of the work).
        used = max(int(mask.sum(1).max()), 1)
        ids, mask = ids[:, :used].to(self.device), mask[:, :used].to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, used, D]
        # Wan zeroes rows past each prompt's tokens (EOS included); masked_fill keeps them exactly 0.
        hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        return F.pad(hidden, (0, 0, 0, self.text_len - used))

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``[B, text_len, d_model]`` in the encoder dtype on ``output_device`` (or :attr:`device`), no gradients."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out_device = self.output_device or self.device
        if self.cache_size <= 0:
            return self._run(prompts).to(out_device)
        dtype = self.dtype
        todo = list(dict.fromkeys(p for p in prompts if (p, dtype) not in self._cache))
        if todo:
            for prompt, row in zip(todo, self._run(todo).to(out_device)):
                self._cache[(prompt, dtype)] = row
        rows = []
        for prompt in prompts:
            self._cache.move_to_end((prompt, dtype))
            rows.append(self._cache[(prompt, dtype)].to(out_device))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(rows)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)

    def to_int8(self) -> "TextEncoder":
        """Store the linear layers and the (tied) token embedding as grouped int8 (:mod:`model.int8`), in place;
        cached embeddings are dropped (they came from the other weights)."""
        quantize_int8_(self.encoder, embeddings=("shared", "encoder.embed_tokens"))
        self._cache.clear()
        return self

    @contextlib.contextmanager
    def streamed(self, device: torch.device | str) -> Iterator["TextEncoder"]:
        """Keep weights where they are (CPU) and copy each layer to ``device`` only while it runs: peak device memory
        one layer (~0.5 GB for UMT5-XXL in bf16) plus the 2 GB embedding (the reference's DynamicSwapInstaller)."""
        device = torch.device(device)
        stack = self.encoder.encoder
        units = [stack.embed_tokens, *stack.block, stack.final_layer_norm]
        handles = [hook for unit in units for hook in (
            unit.register_forward_pre_hook(lambda mod, args, d=device: _swap_in(mod, d)),
            unit.register_forward_hook(lambda mod, args, out: _swap_out(mod)))]
        self._stream_device = device
        try:
            yield self
        finally:
            self._stream_device = None
            for handle in handles:
                handle.remove()

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer_path: str | Path | None = None,
                        dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", text_len: int = 512,
                        output_device: torch.device | str | None = None, cache_size: int = 8,
                        int8: bool = False) -> "TextEncoder":
        """Load, keys checked strictly, from a Wan folder (``models_t5_umt5-xxl-enc-bf16.pth``, tokenizer in
        ``google/umt5-xxl``) or that file, or a transformers folder (``config.json`` + safetensors: a diffusers
        pipeline's ``text_encoder/`` with its sibling ``tokenizer/``, or the pipeline root). ``int8``: the linear
        layers and the token embedding stored as grouped int8 (:mod:`model.int8`), half the memory."""
        path = Path(path)
        if path.is_dir() and not (path / WAN_T5_FILENAME).is_file() and not (path / "config.json").is_file() \
                and (path / "text_encoder" / "config.json").is_file():
            path = path / "text_encoder"  # diffusers pipeline root
        if path.is_file() or (path / WAN_T5_FILENAME).is_file():
            weights = path if path.is_file() else path / WAN_T5_FILENAME
            encoder = umt5_from_wan_state_dict(_load_wan_state_dict(weights), dtype, source=str(weights))
            kind = "Wan .pth"
        elif (path / "config.json").is_file():
            weights, encoder, kind = path, _load_hf_encoder(path, dtype), "transformers"
        else:
            raise WeightsMissingError(f"no text encoder in {path}: expected {WAN_T5_FILENAME} (Wan folder) or "
                                      f"config.json + safetensors; {wan_download_hint(path)}")
        tokenizer_dir = _find_tokenizer(path, tokenizer_path)
        text_encoder = cls(encoder.to(device), load_tokenizer(tokenizer_dir), text_len=text_len,
                           output_device=output_device, cache_size=cache_size)
        if int8:
            text_encoder.to_int8()
        logger.info("Loaded UMT5 encoder (%s format, %d layers, d_model %d, %s%s) from %s; tokenizer from %s",
                    kind, encoder.config.num_layers, encoder.config.d_model, dtype,
                    ", weights stored in int8" if int8 else "", weights, tokenizer_dir)
        return text_encoder


def _swap_in(module: nn.Module, device: torch.device) -> None:
    """Point each parameter at a device copy, remembering the host tensor (no copy back needed: weights are frozen)."""
    module._host_tensors = {}
    for name, param in module.named_parameters():
        module._host_tensors[name] = param.data
        param.data = param.data.to(device, non_blocking=True)


def _swap_out(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        param.data = module._host_tensors[name]
    del module._host_tensors
