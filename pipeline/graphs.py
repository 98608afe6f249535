"""CUDA graphs for the per-block forward of streaming inference (docs/architecture.md, "CUDA graphs per block
position"): a one-frame block's forward launches ~2,000 kernels and frame-wise generation waits on the host (one H200:
4.3 s of DiT wall time held 2.3 s of GPU work); a graph replays them with one launch."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from model.kv_cache import FULL, SCRATCH, CacheMode, CacheView, KVCache
from model.wan import WanModel

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor                 # input buffers, copied into before each replay
    t: torch.Tensor
    out: torch.Tensor               # the flow the replay writes
    keep: tuple                     # tensors the graph reads that nothing else is sure to keep alive (RoPE tables)


class CUDAGraphs:
    """Graph-replayed ``forward_cached`` of one generator, with the one KV cache its graphs read; stands in for the
    generator in :class:`~pipeline.causal.BlockLoop` (``layout`` and ``forward_cached``)."""

    def __init__(self, model: WanModel):
        self.model = model
        self.cache: KVCache | None = None
        self._geometry: tuple | None = None
        self._lease: weakref.finalize | None = None
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream()
        self.disabled = False          # set when a capture fails: everything runs eagerly from then on
        self.fill_cross_ahead = True   # False: a prompt's first call runs eagerly and fills them (benchmark A/B)

    @property
    def layout(self):
        return self.model.layout

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def lease(self, owner, batch: int, height: int, width: int, capacity: int, sink: int,
              dtype: torch.dtype) -> KVCache | None:
        """The kept KV cache for this geometry, reset, until :meth:`release` of ``owner`` (or its garbage
        collection); None while another stream holds it. A new geometry replaces the cache and its graphs."""
        if self.disabled or (self._lease is not None and self._lease.alive):
            return None
        geometry = (batch, height, width, capacity, sink, dtype)
        if geometry != self._geometry:
            self.cache, self._graphs = None, {}
            self.cache = KVCache.for_model(self.model, batch, height, width, capacity, sink, dtype=dtype)
            self._geometry = geometry
        self.cache.reset()
        self._lease = weakref.finalize(owner, lambda: None)   # alive while ``owner`` holds the cache
        return self.cache

    def release(self, owner) -> None:
        """End ``owner``'s lease (a later lease of another stream is left alone)."""
        lease = self._lease
        if lease is not None and lease.alive and lease.peek()[0] is owner:
            lease()

    def _key(self, x, t, cache, start_frame, mode, blocks, view) -> tuple | None:
        """The graph key of a call (its Python ints: start frame, blocks, input shape), or None when no graph may serve
        it: calls past the cache's capacity, other views (than FULL, SCRATCH) and modes."""
        if (self.disabled or cache is not self.cache or CacheMode(mode) is not CacheMode.INFERENCE
                or view not in (FULL, SCRATCH) or cache.origin != 0 or any(cache.placed)
                or start_frame + x.shape[1] > cache.capacity or t.dim() != 2):
            return None
        return start_frame, tuple(blocks), tuple(x.shape), x.dtype, view

    def forward_cached(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cache: KVCache,
                       start_frame: int, *, mode: CacheMode | str = CacheMode.INFERENCE,
                       blocks: tuple[int, ...] = (), view: CacheView = FULL) -> torch.Tensor:
        """:meth:`WanModel.forward_cached`, replayed from a graph where one may serve the call."""
        key = self._key(x, t, cache, start_frame, mode, blocks, view)
        if key is not None and not cache.cross_ready:   # a prompt's first call: its cross K/V first, then the graph
            if self.fill_cross_ahead:
                self.model.fill_cross(context, cache)
            else:
                key = None
        entry = None if key is None else self._graphs.get(key)
        if entry is None:
            out = self.model.forward_cached(x, t, context, cache, start_frame, mode=mode, blocks=blocks, view=view)
            if key is not None:
                self._capture(key, x, t, cache, start_frame, blocks, view)
            return out
        entry.x.copy_(x)
        entry.t.copy_(t)
        entry.graph.replay()
        if view.write:
            cache.advance(start_frame, x.shape[1])
        return entry.out.clone()   # the next replay overwrites ``out``; solvers may keep their inputs

    def _capture(self, key: tuple, x: torch.Tensor, t: torch.Tensor, cache: KVCache, start_frame: int,
                 blocks: tuple[int, ...], view: CacheView) -> None:
        """Record the call's kernels (nothing runs): its eager run just before made every lazy resource."""
        model, n = self.model, x.shape[1]
        patch = model.config.patch_size
        keep = model.rope.tables(tuple(range(start_frame, start_frame + n)), x.shape[3] // patch[1],
                                 x.shape[4] // patch[2], x.device)   # what the call reads (origin 0)
        static_x, static_t = x.clone(), t.clone()
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self._stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    out = model.forward_cached(static_x, static_t, None, cache, start_frame, blocks=blocks, view=view)
                finally:
                    graph.capture_end()
        except RuntimeError as error:   # a kernel that cannot be captured: stay correct, lose the speed
            log.warning("CUDA graph capture failed (%s); the DiT runs without graphs", error)
            self.disabled, self._graphs = True, {}
            return
        finally:
            torch.cuda.current_stream().wait_stream(self._stream)
        self._graphs[key] = _Graph(graph, static_x, static_t, out, keep)

