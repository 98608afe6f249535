"""Positions of the KV cache (model/kv_cache.py) against an explicit recomputation: sink frames placed before the
window, re-basing past the RoPE table leaves attention unchanged, memory and positions stay bounded past 1,024 frames.

The reference (tests/explicit_attention.py) keeps every frame's keys unrotated and rotates them to absolute positions
computed in float64 at each call, so it has no table, no ring and no re-base. Tiny model, float32; tolerance 1e-5
relative (the reference attends in float64; the cache rotates keys twice after a re-base).
"""

import pytest
import torch

from model.kv_cache import KVCache
from model.rope import RotaryTables
from tests import explicit_attention as ref
from tests.tiny import TINY, rel, tiny_model

TOL = 1e-5
CFG = TINY


pytestmark = pytest.mark.usefixtures("single_thread")


def make(n, table=1024):
    m = tiny_model(num_frame_per_block=n)
    m.rope = RotaryTables(CFG.head_dim, table)
    return m


def data(frames, n, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, 16, h, w, generator=g)
    t = (torch.rand(1, frames // n, generator=g) * 1000).repeat_interleave(n, dim=1)   # one timestep per block
    return x, t, torch.randn(1, 5, CFG.text_dim, generator=g)


def streamed(model, x, t, ctx, capacity, sink, positions=None):
    """Blocks through a cache; ``positions`` collects every frame position the RoPE table is asked for."""
    cache = KVCache.for_model(model, 1, x.shape[3], x.shape[4], capacity_frames=capacity, sink_frames=sink)
    if positions is not None:
        tables = model.rope.tables
        model.rope.tables = lambda p, *a: positions.extend(p) or tables(p, *a)
    outs, sizes = [], []
    for s in range(0, x.shape[1], model.num_frame_per_block):
        n = model.num_frame_per_block
        outs.append(model.forward_cached(x[:, s:s + n], t[:, s:s + n], ctx, cache, s))
        sizes.append(cache.nbytes)
    return torch.cat(outs, 1), cache, sizes


def explicit(model, x, t, ctx, capacity, sink):
    """The window rule written out: block [s, e) sees the sink frames, placed right before the oldest other frame
    it sees, and the last ``capacity - sink`` frames up to e (its own included), everything else at its own frame."""
    n, ring = model.num_frame_per_block, capacity - sink
    memory: dict[int, ref.Frame] = {}
    outs = []
    for s in range(0, x.shape[1], n):
        e = s + n
        oldest = min(max(sink, e - ring), s)
        sinks = [(oldest - min(sink, s) + i, memory[i]) for i in range(min(sink, s))]
        recent = [(f, memory[f]) for f in range(max(sink, e - ring), s)]
        out, new = ref.call(model, x[:, s:e], t[:, s:e], ctx, list(range(s, e)), sinks + recent)
        memory.update({s + j: fr for j, fr in enumerate(new)})
        outs.append(out)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("n,capacity,sink,frames", [(1, 4, 1, 9), (2, 6, 2, 12), (3, 9, 3, 21)])
@torch.no_grad()
def test_sink_sits_before_the_window(n, capacity, sink, frames):
    """After the window slides, what a block sees is laid out as one clip: sink frames, then the window."""
    model = make(n)
    x, t, ctx = data(frames, n, 4, 6)
    out, cache, _ = streamed(model, x, t, ctx, capacity, sink)
    assert rel(out, explicit(model, x, t, ctx, capacity, sink)) < TOL
    assert cache.placed[0] == frames - capacity   # the sink slots now hold keys moved by that many frames


@torch.no_grad()
def test_rebase_leaves_attention_unchanged():
    """A 16-position table forces a re-base every few blocks; outputs equal the 1,024-position run (which never
    re-bases) and the explicit absolute-position recomputation, and no position reaches the table's end."""
    x, t, ctx = data(40, 1, 4, 6)
    small, large = make(1, table=16), make(1)
    positions = []
    out_small, cache, _ = streamed(small, x, t, ctx, 5, 1, positions)
    out_large, _, _ = streamed(large, x, t, ctx, 5, 1)
    assert cache.origin > 0 and max(positions) < 16
    assert rel(out_small, out_large) < TOL
    assert rel(out_small, explicit(large, x, t, ctx, 5, 1)) < TOL


@torch.no_grad()
def test_stream_past_1024_frames_keeps_memory_and_positions_bounded():
    """1,100 frame-wise blocks of one token each through the real 1,024-position table: the cache's memory never
    changes, positions stay inside the table, and the last blocks equal the explicit recomputation."""
    model = make(1)
    x, t, ctx = data(1100, 1, 2, 2)
    positions = []
    out, cache, sizes = streamed(model, x, t, ctx, 6, 1, positions)
    assert len(set(sizes)) == 1 and cache.origin > 0 and max(positions) < 1024
    assert rel(out[:, -20:], explicit(model, x, t, ctx, 6, 1)[:, -20:]) < TOL


def test_window_too_large_for_the_table_fails_before_any_block():
    cache = KVCache.for_model(make(1, table=16), 1, 4, 6, capacity_frames=14, sink_frames=1)
    cache.check_positions(2)
    with pytest.raises(ValueError, match="window of 14 frames plus calls of 3 frames exceed the 16 RoPE positions"):
        cache.check_positions(3)
