"""Process groups and FSDP2 sharding, applied from outside the model (model/ imports nothing distributed).

* :func:`init_distributed` -- under ``torchrun``: NCCL (+ gloo for CPU tensors) on CUDA, gloo on CPU, the CUDA device
  set to ``LOCAL_RANK``. Without ``torchrun``: a one-process group over an in-memory store, so collectives, DCP and
  FSDP2 run through the same code path in a plain ``python train.py`` and in tests.
* :func:`apply_fsdp` -- ``fully_shard`` on each transformer block, then on the root (torchtitan's order). Strategies
  (training.md §8.2, reference FSDP1 names): ``full`` shards over every rank; ``hybrid_full`` replicates across nodes
  and shards within a node (HSDP; on one node this is ``full``); ``hybrid_zero2`` is ``hybrid_full`` that keeps the
  parameters gathered between forward and backward; ``no_shard`` replicates (DDP-like).
* :func:`shard_frozen` -- the same for frozen networks (teacher, text encoder), which get no optimizer.
"""

from __future__ import annotations

import datetime
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

STRATEGIES = ("full", "hybrid_full", "hybrid_zero2", "no_shard")
# Names of the ModuleList that holds a network's repeated blocks: ours/Wan (``blocks``), HF T5 (``block``), others.
BLOCK_LIST_NAMES = ("blocks", "block", "layers")
# Entry points besides ``forward`` and ``forward_*`` (the text encoder's ``encode``), see _forward_methods.
FORWARD_METHODS = ("encode",)
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


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed() -> World:
    """Initialise the default process group once (idempotent) and return this process's :class:`World`."""
    global _created_group
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        # CPU tensors still need gloo on GPU runs (RNG states, object collectives), hence the two-backend string.
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: env:// rendezvous
            dist.init_process_group(backend, timeout=_TIMEOUT)
        else:  # plain `python`: one rank over an in-memory store, no port, no file
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=_TIMEOUT)
        _created_group = True
        logger.info("process group up: backend %s, world size %d", backend, dist.get_world_size())
    return world()


def close_distributed() -> None:
    """Destroy the default group if :func:`init_distributed` created it (a later call may create a new one)."""
    global _created_group
    if _created_group and dist.is_initialized():
        dist.destroy_process_group()
    _created_group = False


def world() -> World:
    """Rank, world size, local rank, ranks per node and device of this process (one process when not initialised)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return World(rank, world_size, local_rank, local_world_size, device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (a CPU all-reduce, also a barrier; works on gloo and
    cpu:gloo,cuda:nccl). Lets every rank learn of a failure on one, instead of waiting at the next collective."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ---------------------------------------------------------------------------------------------------------------------
# FSDP2


def build_mesh(strategy: str, w: World | None = None) -> DeviceMesh:
    """The data-parallel device mesh of a sharding strategy.

    1-D ``("shard",)`` for ``full`` and for the hybrid strategies on one node; 2-D ``("replicate", "shard")`` with
    ``replicate = nodes`` for the hybrid strategies on several nodes (HSDP) and ``replicate = world, shard = 1`` for
    ``no_shard``. Nodes are counted from ``LOCAL_WORLD_SIZE`` (set by torchrun).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    w = w or world()
    device_type = w.device.type
    if strategy == "no_shard":
        return init_device_mesh(device_type, (w.world_size, 1), mesh_dim_names=("replicate", "shard"))
    hybrid = strategy.startswith("hybrid") and w.num_nodes > 1 and w.world_size % w.local_world_size == 0
    if hybrid:
        return init_device_mesh(device_type, (w.num_nodes, w.local_world_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (w.world_size,), mesh_dim_names=("shard",))


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ModuleLists named ``blocks``/``block``/``layers`` in ``model``, outermost matches only (a block's own
    sub-lists are not split further)."""
    lists, taken = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or name.rsplit(".", 1)[-1] not in BLOCK_LIST_NAMES:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        taken.append(name)
        lists.append(module)
    return lists


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` (the elements of its block lists), in order."""
    return [block for blocks in _block_lists(model) for block in blocks]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each transformer block so its activations are recomputed in backward (torchtitan's way, from outside).

    The one gradient-checkpointing switch (``cfg.gradient_checkpointing``, applied by the training loop); models have
    no flag of their own. Must run before :func:`apply_fsdp`: FSDP2's hooks then sit on the wrapper and the
    recomputation calls the inner block only. A model that checkpoints its own FSDP-sharded blocks re-enters FSDP's
    forward hook during recomputation, which skips the bf16 input cast and fails checkpoint's metadata check under
    mixed precision. Parameter names gain ``_checkpoint_wrapped_module.``, which the state-dict helpers strip.
    """
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            if not isinstance(block, CheckpointWrapper):
                blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def activation_checkpointed(model: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` wrapped ``model``'s blocks (their forward is recomputed in
    backward, reading whatever state they read again then)."""
    return any(isinstance(block, CheckpointWrapper) for block in transformer_blocks(model))


def _policy(mixed_precision: bool) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 master weights and fp32 gradient reduction (training.md §8.2); CPU tests run fp32.

    Forward inputs are NOT cast, as in the reference's policy: a cast would round the fp32 timesteps to bf16 (937.5 ->
    936) before the sinusoidal embedding and the fp32 RoPE tables the blocks receive. Callers pass latents and text
    embeddings in bf16 under mixed precision (the reference's ``dtype``) and timesteps in fp32.
    """
    if mixed_precision:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def _forward_methods(model: nn.Module) -> list[str]:
    """Methods that callers use instead of ``forward`` (``forward_*``, ``encode``): FSDP2 must run its
    unshard/reshard hooks around them too, or the root's parameters stay sharded inside them."""
    names = [n for n in dir(type(model)) if n.startswith("forward_") or n in FORWARD_METHODS]
    return [n for n in names if callable(getattr(type(model), n, None))]


def apply_fsdp(model: nn.Module, strategy: str, mixed_precision: bool, device_mesh: DeviceMesh | None = None,
               reshard_after_forward: bool = True, cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block, then the root. Returns ``model``.

    Parameters become DTensors (``Shard(0)`` over the mesh's last dim). ``hybrid_zero2`` forces
    ``reshard_after_forward=False`` (ZeRO-2: gathered parameters stay until backward, more memory, less traffic).
    """
    mesh = device_mesh if device_mesh is not None else build_mesh(strategy)
    reshard = reshard_after_forward and strategy != "hybrid_zero2"
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
    """Shard a frozen network (teacher, real score, text encoder): no gradients, eval mode, no optimizer.

    A result cache (``TextEncoder.cache_size``) is switched off when the mesh spans several ranks: a cache hit skips
    the forward, and with it FSDP's all-gathers, on one rank while another rank runs it, so the collectives of the
    ranks would no longer match (gloo aborts with a size mismatch, NCCL hangs).
    """
    model.requires_grad_(False).eval()
    mesh = device_mesh if device_mesh is not None else build_mesh(strategy)
    if getattr(model, "cache_size", 0) > 0 and mesh.size() > 1:
        model.cache_size = 0
        logger.info("%s: prompt cache off (sharded over %d ranks)", type(model).__name__, mesh.size())
    return apply_fsdp(model, strategy, mixed_precision, mesh, reshard_after_forward=True, cpu_offload=cpu_offload)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2's ``no_sync``: skip (False) or do (True) the gradient reduce-scatter/all-reduce of the next backward.

    While off, unsharded gradients accumulate locally (the memory of one full fp32 gradient copy)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
