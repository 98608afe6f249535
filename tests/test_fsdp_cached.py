"""The streaming (KV-cache) path of a generator sharded per block with FSDP2, as the training loop shards it for the
self-forcing rollout: every block must touch only its own weights (cross-attention K/V are filled inside the block)."""

import torch

from model.kv_cache import KVCache
from model.wan import WanModel
from toy.folders import TINY_DIT
from utils.distributed import apply_fsdp, close_distributed, init_distributed


def test_cached_forward_under_per_block_fsdp_matches_unsharded():
    init_distributed()
    try:
        torch.manual_seed(0)
        ref = WanModel(TINY_DIT, causal=True, num_frame_per_block=1).eval()
        with torch.no_grad():
            ref.head.head.weight.normal_(std=0.1)
        sharded = WanModel(TINY_DIT, causal=True, num_frame_per_block=1).eval()
        sharded.load_state_dict(ref.state_dict())
        apply_fsdp(sharded, "full", mixed_precision=False)
        x, ctx = torch.randn(1, 2, 16, 4, 4), torch.randn(1, 5, TINY_DIT.text_dim)
        outs = []
        for model in (ref, sharded):
            cache = KVCache(TINY_DIT.num_layers, 1, 4, TINY_DIT.num_heads, TINY_DIT.head_dim, capacity_frames=2)
            with torch.no_grad():
                model.forward_cached(x[:, :1], torch.full((1, 1), 500.0), ctx, cache, 0)
                outs.append(model.forward_cached(x[:, 1:], torch.full((1, 1), 500.0), ctx, cache, 1))
        assert (outs[0] - outs[1]).abs().max() / outs[0].abs().max() < 1e-5
    finally:
        close_distributed()
