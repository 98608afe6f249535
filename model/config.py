"""Wan2.1 DiT hyper-parameters as data, under the original constructor names (an original ``config.json`` reads
directly). Presets are values: 1.3B, 14B and the tiny test sizes build the same network."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from utils.errors import ConfigError


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan2.1 diffusion transformer (model_and_inference.md §2.1)."""

    dim: int = 1536                      # model width D
    ffn_dim: int = 8960                  # hidden width of the feed-forward network
    freq_dim: int = 256                  # sinusoidal timestep feature size
    text_dim: int = 4096                 # text-encoder feature size (UMT5-XXL width)
    num_heads: int = 12                  # attention heads; head size is dim / num_heads
    num_layers: int = 30                 # transformer blocks
    text_len: int = 512                  # text tokens cross-attended (context is zero-padded to this)
    in_dim: int = 16                     # latent channels in
    out_dim: int = 16                    # latent channels out
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patch; tokens per frame = (H/ph)·(W/pw)
    qk_norm: bool = True                 # RMSNorm on q and k over all heads
    cross_attn_norm: bool = True         # affine LayerNorm (norm3) before cross-attention
    eps: float = 1e-6                    # norm epsilon
    model_type: str = "t2v"              # only text-to-video is supported
    rope_max_positions: int = field(default=1024)  # RoPE table length per axis (frames, rows, columns)

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head size {self.head_dim} must be even for RoPE")
        if self.model_type != "t2v":
            raise ConfigError(f"model_type {self.model_type!r} is not supported (only 't2v')")
        if len(self.patch_size) != 3:
            raise ConfigError(f"patch_size must have 3 entries, got {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of size ``height`` x ``width``."""
        return (height // self.patch_size[1]) * (width // self.patch_size[2])

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "patch_size": list(self.patch_size)}

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        """Build from a dict of constructor arguments; keys starting with ``_`` (diffusers metadata) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        # window_size: always (-1, -1) in Wan2.1; windowing is a streaming choice here
        d = {k: v for k, v in d.items() if not k.startswith("_") and k != "window_size"}
        if unknown := sorted(set(d) - names):
            raise ConfigError(f"unknown Wan config keys: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"_class_name": "WanModel", **self.to_dict()}, f, indent=2)


PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Tiny sizes for tests and the CPU toy world: same code, small numbers.
    "tiny": WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=2, text_len=16),
}

# Folder names users download (``hf download Wan-AI/<name>``) map onto presets.
PRESET_ALIASES = {"Wan2.1-T2V-1.3B": "wan2.1-t2v-1.3b", "Wan2.1-T2V-14B": "wan2.1-t2v-14b"}


def get_preset(name: str) -> WanConfig:
    """Return the preset called ``name`` (case-insensitive; Wan folder names accepted)."""
    key = PRESET_ALIASES.get(name, name).lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]
