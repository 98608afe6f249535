"""Exponential moving average of a (possibly FSDP2-sharded) network: fp32 DTensor clones of this rank's shards (DCP
reshards them), updated by one ``torch._foreach_lerp_`` with no all-gather, CPU copy or host sync."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from utils.errors import key_mismatch

# Segments that wrappers (activation checkpointing, torch.compile, FSDP1, DDP) insert into parameter names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """Parameter name without wrapper segments, so checkpoints never depend on how a network was wrapped."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing storage), or the tensor itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


class ShardLocalEMA:
    """``shadow <- decay * shadow + (1 - decay) * param`` over ``module``'s trainable parameters; create it after
    ``fully_shard``, so that it holds the sharded parameters the optimizer updates."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        named = [(canonical_name(n), p) for n, p in module.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in named}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the tracked parameters' current values (call after ``optimizer.step()``)."""
        shadows = [_local(s) for s in self.shadow.values()]
        params = [_local(p.detach()) for p in self._params]
        params = [p if p.dtype == torch.float32 else p.float() for p in params]
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors themselves (DTensors when sharded): DCP saves and loads them in place."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise KeyError("EMA state does not match the network: "
                           + key_mismatch(set(self.shadow) - set(state), set(state) - set(self.shadow)))
        for name, value in state.items():
            if value is not self.shadow[name]:
                self.shadow[name].copy_(value)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 CPU tensors by canonical name on rank 0, ``{}`` on the others (collective), gathered one
        parameter at a time."""
        is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        out = {}
        for name, s in self.shadow.items():
            full = s.full_tensor() if isinstance(s, DTensor) else s
            if is_main:
                out[name] = full.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the shadow into ``module``'s parameters (same architecture, sharded the same way), e.g. the target
        network of consistency distillation."""
        named = {canonical_name(n): p for n, p in module.named_parameters()}
        if missing := set(self.shadow) - set(named):
            raise KeyError(f"copy_to: the module does not fit the EMA: {key_mismatch(missing)}")
        dst = [_local(named[n].detach()) for n in self.shadow]
        torch._foreach_copy_(dst, [_local(s) for s in self.shadow.values()])

