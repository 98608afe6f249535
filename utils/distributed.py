"""Process groups and FSDP2 sharding, applied from outside the model (model/ imports nothing distributed).

Strategies (the reference's FSDP1 names): ``full`` shards over every rank; ``hybrid_full`` replicates across nodes and
shards within one (HSDP); ``hybrid_zero2`` also keeps the parameters gathered until backward; ``no_shard`` replicates.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

logger = logging.getLogger(__name__)

# Names of the ModuleList that holds a network's repeated blocks: ours/Wan (``blocks``), HF T5 (``block``), others.
BLOCK_LIST_NAMES = ("blocks", "block", "layers")
_TIMEOUT = datetime.timedelta(minutes=30)  # the reference's NCCL timeout; a slow first save must not kill the job
_created_group = False  # whether init_distributed made the default group (then close_distributed destroys it)


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, world size, rank within the node, ranks per node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def init_distributed() -> World:
    """Initialise the default process group once (a one-rank group without ``torchrun``, so collectives, DCP and FSDP2
    run the same code everywhere) and return this process's :class:`World`."""
    global _created_group
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        # CPU tensors still need gloo on GPU runs (RNG states, object collectives), hence the two-backend string.
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: env:// rendezvous
            dist.init_process_group(backend, timeout=_TIMEOUT)
        else:  # plain `python`: one rank over an in-memory store, no port, no file
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=_TIMEOUT)
        _created_group = True
        logger.info("process group up: backend %s, world size %d", backend, dist.get_world_size())
    return world()


def close_distributed(finished: bool = True) -> None:
    """Destroy the default group if :func:`init_distributed` created it. After a finished run the ranks meet at a
    barrier and the groups are collected first (a rank exiting mid-teardown of its peer aborts gloo now and then);
    not after a failure, where a crashed peer would never reach it."""
    global _created_group
    if _created_group and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()
    _created_group = False


def world() -> World:
    """Rank, world size, local rank, ranks per node and device of this process (one process when not initialised)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return World(rank, world_size, local_rank, local_world_size, device)


def multi_rank() -> bool:
    """Whether collectives have other ranks to talk to (skipped otherwise: one rank has nothing to exchange)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (a CPU all-reduce): every rank learns of a failure on one, instead
    of waiting at the next collective."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if multi_rank():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def build_mesh(strategy: str, w: World | None = None) -> DeviceMesh:
    """The data-parallel mesh of a strategy: 1-D ``("shard",)``, or 2-D ``("replicate", "shard")`` for the hybrid
    strategies on several nodes (``LOCAL_WORLD_SIZE`` ranks each) and for ``no_shard`` (shard = 1)."""
    w = w or world()
    if strategy == "no_shard":
        return init_device_mesh(w.device.type, (w.world_size, 1), mesh_dim_names=("replicate", "shard"))
    if strategy.startswith("hybrid") and w.num_nodes > 1 and w.world_size % w.local_world_size == 0:
        return init_device_mesh(w.device.type, (w.num_nodes, w.local_world_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(w.device.type, (w.world_size,), mesh_dim_names=("shard",))


def fsdp_needed(mesh: DeviceMesh, mixed_precision: bool, cpu_offload: bool = False) -> bool:
    """Whether FSDP2 has work to do: shard over more than one rank, cast to bf16, or offload to the CPU. On one rank in
    fp32 it would only add hooks, copies and a collective to every block call."""
    return mesh.size() > 1 or mixed_precision or cpu_offload


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The outermost ModuleLists named ``blocks``/``block``/``layers`` in ``model``."""
    found: dict[str, nn.ModuleList] = {}
    for name, module in model.named_modules():
        outer = not any(name.startswith(prefix + ".") for prefix in found)
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and outer:
            found[name] = module
    return list(found.values())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` (the elements of its block lists), in order."""
    return [block for blocks in _block_lists(model) for block in blocks]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each transformer block so its activations are recomputed in backward. Call before :func:`apply_fsdp`, so
    FSDP2's hooks sit on the wrapper (recomputing inside FSDP's forward hook skips the bf16 input cast and fails
    checkpoint's metadata check). Names gain ``_checkpoint_wrapped_module.``."""
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            if not isinstance(block, CheckpointWrapper):
                blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def activation_checkpointed(model: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` wrapped ``model``'s blocks."""
    return any(isinstance(block, CheckpointWrapper) for block in transformer_blocks(model))


def _policy(mixed_precision: bool) -> MixedPrecisionPolicy:
    """bf16 compute, fp32 masters and gradient reduction (training.md §8.2). Forward inputs are NOT cast (as in the
    reference): a cast would round fp32 timesteps (937.5 -> 936) and the RoPE tables; callers pass latents and text
    in bf16, timesteps in fp32."""
    bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else {}
    return MixedPrecisionPolicy(cast_forward_inputs=False, **bf16)


def _forward_methods(model: nn.Module) -> list[str]:
    """Methods that callers use instead of ``forward`` (``forward_*``, ``encode``): FSDP2 must run its
    unshard/reshard hooks around them too, or the root's parameters stay sharded inside them."""
    names = [n for n in dir(type(model)) if n.startswith("forward_") or n == "encode"]
    return [n for n in names if callable(getattr(type(model), n, None))]


def apply_fsdp(model: nn.Module, strategy: str, mixed_precision: bool, device_mesh: DeviceMesh | None = None,
               cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2, each transformer block then the root; returns it. ``hybrid_zero2`` keeps
    gathered parameters until backward (more memory, less traffic)."""
    mesh = device_mesh if device_mesh is not None else build_mesh(strategy)
    reshard = strategy != "hybrid_zero2"
    kwargs = dict(mesh=mesh, mp_policy=_policy(mixed_precision),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    # A trainable root's parameters (embeddings, head) are needed again at the start of backward: keep them gathered.
    # A frozen root has no backward that would free them, so it reshards (a text encoder's embedding is ~1B params).
    trainable = any(p.requires_grad for p in model.parameters())
    fully_shard(model, reshard_after_forward=not trainable, **kwargs)
    for name in _forward_methods(model):
        register_fsdp_forward_method(model, name)
    return model


def shard_frozen(model: nn.Module, strategy: str = "full", mixed_precision: bool = False,
                 device_mesh: DeviceMesh | None = None, cpu_offload: bool = False) -> nn.Module:
    """Shard a frozen network (teacher, real score, text encoder). A result cache (``TextEncoder.cache_size``) is
    switched off over several ranks: a hit would skip the forward's all-gathers on one rank only (NCCL would hang)."""
    model.requires_grad_(False).eval()
    mesh = device_mesh if device_mesh is not None else build_mesh(strategy)
    if getattr(model, "cache_size", 0) > 0 and mesh.size() > 1:
        model.cache_size = 0
        logger.info("%s: prompt cache off (sharded over %d ranks)", type(model).__name__, mesh.size())
    return apply_fsdp(model, strategy, mixed_precision, mesh, cpu_offload=cpu_offload)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2's ``no_sync``: skip (False) or do the gradient reduction of the next backward (while off, one full fp32
    gradient copy accumulates locally)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
