"""The HNSW backend of the search index (``faiss-hnsw``), with removal by tombstones and a compaction
that rebuilds the graph while the old one keeps serving (the other FAISS backends are in
:mod:`deepmetric.inference.faiss_backends`).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .faiss_compat import search_with_params
from .faiss_backends import FaissBackend, flat_vectors

log = logging.getLogger("deepmetric")


class HNSWBackend(FaissBackend):
    """``IndexHNSWFlat``; its arrays are the vectors and the graph (levels, link offsets, links, entry), and
    ``hnsw_alive`` (one byte per stored row) while it holds removed rows.

    FAISS cannot remove from an HNSW graph, so ``keep`` marks removed rows dead (a tombstone) and
    searches skip them (an ``IDSelectorBitmap``): a removal costs O(N) bytes of bookkeeping, not a
    rebuild. Dead rows stay in the graph (they still route searches) until :meth:`compaction` rebuilds
    it over the live rows, which a server does in the background (:class:`HNSWCompaction`).
    """

    name = "faiss-hnsw"
    defaults = {"M": 32, "ef_construction": 64, "ef_search": 96}
    knobs = ("ef_search",)
    #: compact once this share of the stored rows is dead
    COMPACT_AT = 0.25

    def __init__(self, dim: int, metric: str, params: Dict[str, Any]) -> None:
        super().__init__(dim, metric, params)
        self._set_alive(np.zeros(0, bool))

    def _set_alive(self, alive: np.ndarray) -> None:
        """Live rows are the alive slots in order: ``_live[row]`` is its slot, ``_row[slot]`` its row."""
        self._alive = alive
        self._live = np.flatnonzero(alive)
        self._row = np.cumsum(alive, dtype=np.int64) - 1
        self._params = None
        if len(self._live) < len(alive):  # the selector reads the bitmap in place: keep both referenced
            self._bitmap = np.packbits(alive, bitorder="little")
            self._selector = self.faiss.IDSelectorBitmap(len(alive), self.faiss.swig_ptr(self._bitmap))
            self._params = self.faiss.SearchParametersHNSW(sel=self._selector)
            self._params.efSearch = int(self.params["ef_search"])

    @property
    def ntotal(self) -> int:
        return len(self._live)

    @property
    def slots(self) -> int:
        return len(self._alive)

    def _create(self, x: Optional[np.ndarray]) -> Any:
        index = self.faiss.IndexHNSWFlat(self.dim, int(self.params["M"]), self._mt)
        index.hnsw.efConstruction = int(self.params["ef_construction"])
        return index

    def _apply_knobs(self) -> None:
        self.index.hnsw.efSearch = int(self.params["ef_search"])
        if self._params is not None:
            self._params.efSearch = int(self.params["ef_search"])

    def add(self, x: np.ndarray) -> None:
        super().add(x)
        self._set_alive(np.concatenate([self._alive, np.ones(len(x), bool)]))

    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.index is None or not self.ntotal:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        k = min(k, self.ntotal)
        if self._params is None:
            scores, slots = self.index.search(q, k)
        else:
            search_with_params()  # faiss.contrib.torch_utils (PML imports it) drops params
            scores, slots = self.index.search(q, k, params=self._params)
        slots = slots.astype(np.int64)
        return scores, np.where(slots >= 0, self._row[np.maximum(slots, 0)], -1)

    def keep(self, mask: np.ndarray) -> None:
        alive = self._alive.copy()
        alive[self._live[~mask]] = False
        self._set_alive(alive)

    def state(self) -> Dict[str, np.ndarray]:
        h, v2a = self.index.hnsw, self.faiss.vector_to_array
        out = {"vectors": flat_vectors(self.faiss, self.index.storage, self.dim),
               "hnsw_levels": v2a(h.levels), "hnsw_offsets": v2a(h.offsets).astype(np.int64),
               "hnsw_neighbors": v2a(h.neighbors), "hnsw_entry": np.array([h.entry_point, h.max_level], np.int64)}
        if self.slots > self.ntotal:
            out["hnsw_alive"] = self._alive.astype(np.uint8)
        return out

    def expected(self, count: int, slots: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        out = {"vectors": ("F32", (slots, self.dim)), "hnsw_levels": ("I32", (slots,)),
               "hnsw_offsets": ("I64", (slots + 1,)), "hnsw_neighbors": ("I32", None), "hnsw_entry": ("I64", (2,))}
        if slots > count:
            out["hnsw_alive"] = ("U8", (slots,))
        return out

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        index = self._create(None)
        h, a2v = index.hnsw, self.faiss.copy_array_to_vector
        levels, offsets, links = arrays["hnsw_levels"], arrays["hnsw_offsets"], arrays["hnsw_neighbors"]
        entry, top = (int(v) for v in arrays["hnsw_entry"])
        _check_hnsw_graph(levels, offsets, links, entry, top, self.faiss.vector_to_array(h.cum_nneighbor_per_level))
        alive = arrays.get("hnsw_alive", np.ones(len(levels), np.uint8))
        if int(alive.max(initial=0)) > 1:
            raise ValueError("hnsw_alive holds values other than 0 and 1")
        self.faiss.downcast_index(index.storage).add(np.ascontiguousarray(arrays["vectors"]))
        a2v(np.ascontiguousarray(levels), h.levels)
        a2v(offsets.astype(np.uint64), h.offsets)
        a2v(np.ascontiguousarray(links), h.neighbors)
        h.entry_point, h.max_level, index.ntotal = entry, top, len(levels)
        self.index = index
        self._set_alive(alive.astype(bool))
        self._apply_knobs()

    def compaction(self, force: bool = False) -> Optional["HNSWCompaction"]:
        """A rebuild of the graph over the live rows, once ``COMPACT_AT`` of the stored rows are dead
        (``force``: once any is); None otherwise. Start it where no change runs (it copies the live
        vectors), :meth:`HNSWCompaction.build` it anywhere, install it where no search or change runs."""
        dead = self.slots - self.ntotal
        if not dead or (not force and dead < self.COMPACT_AT * self.slots):
            return None
        return HNSWCompaction(self)


class HNSWCompaction:
    """Rebuilding an HNSW graph without its dead rows, in three steps so that only the last, short one
    needs the index to itself: the live vectors are copied (``__init__``), a new graph is built from the
    copy (:meth:`build`: seconds per 100k rows, while the old graph keeps serving), and :meth:`install`
    catches up with the rows added and removed meanwhile, then swaps the graphs."""

    def __init__(self, backend: HNSWBackend) -> None:
        self.backend, self.base = backend, backend.slots
        self.live = backend._live.copy()  # slots of the rows the new graph holds, in order
        self.vectors = np.array(flat_vectors(backend.faiss, backend.index.storage, backend.dim)[self.live])
        self.index: Any = None

    def build(self) -> None:
        index = self.backend._create(None)
        index.add(self.vectors)
        self.index, self.vectors = index, None

    def install(self) -> None:
        """Swap in the built graph; rows added since it started are inserted, rows removed since stay dead."""
        b = self.backend
        if self.index is None:
            raise RuntimeError("HNSWCompaction.install before build")
        if b.slots > self.base:
            self.index.add(np.array(flat_vectors(b.faiss, b.index.storage, b.dim)[self.base:]))
        alive = np.concatenate([b._alive[self.live], b._alive[self.base:]])
        log.info("faiss-hnsw: compacted the graph from %d to %d rows (%d live)", b.slots, len(alive), int(alive.sum()))
        b.index = self.index
        b._set_alive(alive)
        b._apply_knobs()


def _check_hnsw_graph(levels: np.ndarray, offsets: np.ndarray, links: np.ndarray, entry: int, top: int,
                      cum: np.ndarray, chunk: int = 4096) -> None:
    """Refuse a graph FAISS could not search safely: node ``i`` has ``levels[i]`` levels and its level-``l``
    links at ``offsets[i] + cum[l] .. offsets[i] + cum[l + 1]``; every link must name a node that has
    that level. Checked ``chunk`` nodes at a time, so the temporaries stay small."""
    n = len(levels)
    if n == 0:
        if entry != -1 or len(links) or offsets[0] != 0:
            raise ValueError("an empty HNSW graph with links or an entry point")
        return
    if int(levels.min()) < 1 or int(levels.max()) > len(cum) - 1:
        raise ValueError(f"hnsw_levels outside 1..{len(cum) - 1}")
    if offsets[0] != 0 or offsets[-1] != len(links):
        raise ValueError("hnsw_offsets do not run from 0 to the number of links")
    if not 0 <= entry < n or top != int(levels[entry]) - 1 or top != int(levels.max()) - 1:
        raise ValueError("hnsw_entry is not a node of the top level")
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        sizes = cum[levels[s:e]].astype(np.int64)
        if not np.array_equal(offsets[s + 1:e + 1] - offsets[s:e], sizes):
            raise ValueError("hnsw_offsets do not match the nodes' levels")
        nb = links[offsets[s]:offsets[e]]
        slot = np.arange(offsets[s], offsets[e]) - np.repeat(offsets[s:e], sizes)
        level = np.searchsorted(cum, slot, side="right") - 1
        if int(nb.min(initial=0)) < -1 or int(nb.max(initial=0)) >= n or \
                not ((nb < 0) | (levels[np.maximum(nb, 0)] > level)).all():
            raise ValueError("hnsw_neighbors: a link to no node, or to a node without that level")
