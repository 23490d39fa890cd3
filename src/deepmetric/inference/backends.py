"""The search index's backends: exact search (numpy) and four FAISS structures, behind one small interface.

Each backend stores vectors already prepared for its metric (normalised for cosine) in rows 0..N-1 and
answers ``search(queries, k) -> (scores (Q, k), rows (Q, k))``, best first, rows -1 where fewer than k
exist. ``state()`` gives its arrays for the file, ``restore()`` rebuilds it from checked arrays
(``expected()`` says their dtypes and shapes), ``keep(mask)`` drops the rows where mask is False, the
others keeping their order. The table of what each costs is in :mod:`deepmetric.inference.index`.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import UserError

log = logging.getLogger("deepmetric")

#: integer parameters: (lowest, highest) accepted, from the command line or from a file
_PARAM_RANGES = {"query_chunk": (1, 1 << 24), "nlist": (1, 1 << 24), "nprobe": (1, 1 << 24), "m": (1, 4096),
                 "nbits": (1, 16), "refine": (0, 4096), "M": (2, 512), "ef_construction": (1, 1 << 16),
                 "ef_search": (1, 1 << 16)}
#: query rows per chunk of exact search by default: about 16M scores (64 MB of float32) at once
_CHUNK_ELEMENTS = 1 << 24


class SearchIndexError(UserError):
    """A bad argument to an index: unknown backend or metric, wrong vector size, centroids without labels."""


class FaissMissingError(SearchIndexError):
    """A FAISS backend asked for where FAISS is not installed."""


def _checked_params(backend: str, params: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(params) - set(defaults)
    if unknown:
        raise SearchIndexError(f"backend {backend}: unknown parameter(s) {sorted(unknown)} "
                               f"(valid: {', '.join(defaults) or 'none'})")
    for key, value in params.items():
        lo, hi = _PARAM_RANGES[key]
        if value is None and defaults[key] is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise SearchIndexError(f"backend {backend}: {key} must be an integer from {lo} to {hi}, got {value!r}")
    return dict(params)


def exact_topk(q: np.ndarray, g: np.ndarray, sq: Optional[np.ndarray], k: int, metric: str
               ) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``g (n, D)`` for each query of ``q (c, D)`` (float32):
    ``(keys (c, k) float64, rows (c, k) int64)``, ordered by (key, row): the keys of
    :mod:`deepmetric.evaluation.neighbors` (``-<q, g>`` for cosine, ``|g|^2 - 2<q, g>`` squared
    Euclidean, with ``sq = |g|^2``) and its tie rule (equal keys: lower row first). NaN keys rank last.

    One matrix product finds the candidates: every row whose key is within the product's rounding error
    of the ``k``-th smallest. Their keys are then computed again one dot product at a time in float64,
    the same arithmetic for every pair, so identical gallery vectors get identical keys and tie (a BLAS
    product rounds the same vector differently at different columns).

    >>> g = np.array([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], np.float32)
    >>> keys, rows = exact_topk(np.array([[1.0, 0.0]], np.float32), g, None, 2, "cosine")
    >>> keys.tolist(), rows.tolist()
    ([[-1.0, -1.0]], [[0, 2]])
    """
    c, n = q.shape[0], g.shape[0]
    keys = q @ g.T
    if metric == "cosine":
        np.negative(keys, out=keys)
    else:
        keys *= -2.0
        keys += sq
    keys[np.isnan(keys)] = np.inf
    if k < n:
        kth = np.partition(keys, k - 1, axis=1)[:, k - 1]
        qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
        gmax = float(np.sqrt(np.einsum("ij,ij->i", g, g, dtype=np.float64).max()))
        # a float32 dot product of length D is off by at most about D * 2^-24 * |q| |g|; 4x that, twice
        tol = 8 * q.shape[1] * 2.0 ** -24 * (2 * qn * gmax + (0.0 if metric == "cosine" else gmax * gmax))
        rows, cols = np.nonzero(keys <= (kth + tol)[:, None])
    else:
        rows, cols = np.divmod(np.arange(c * n), n)
    exact = np.empty(len(rows))
    step = max(1, (1 << 22) // max(1, q.shape[1]))
    for s in range(0, len(rows), step):  # float64 dots, a block of candidate pairs at a time
        r, j = rows[s:s + step], cols[s:s + step]
        exact[s:s + step] = np.einsum("md,md->m", q[r], g[j], dtype=np.float64)
    if metric == "cosine":
        np.negative(exact, out=exact)
    else:
        exact = np.einsum("md,md->m", g[cols], g[cols], dtype=np.float64) - 2.0 * exact if len(cols) else exact
    exact[np.isnan(exact)] = np.inf
    order = np.lexsort((cols, exact, rows))
    rows, cols, exact = rows[order], cols[order], exact[order]
    counts = np.bincount(rows, minlength=c)
    keep = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows] < k
    return exact[keep].reshape(c, k), cols[keep].reshape(c, k).astype(np.int64)


def _torch_neighbors() -> Any:
    """:mod:`deepmetric.evaluation.neighbors` where PyTorch is installed, else None (exact search then
    runs on numpy). Imported when an exact backend is made: search alone never loads PyTorch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from ..evaluation import neighbors

    return neighbors


class ExactBackend:
    """All vectors in one float32 array; chunks of queries ranked by the keys and tie rule of
    :mod:`deepmetric.evaluation.neighbors` (``-<q, g>`` for cosine, ``|g|^2 - 2<q, g>`` squared
    Euclidean; equal keys: lower row first), memory ``query_chunk x N``. With PyTorch installed the
    ranking is the evaluation's own (``stable_topk`` on the same float32 keys, so search and
    evaluation agree to the bit); without it, :func:`exact_topk` in numpy (the same order, scores to
    float32 rounding), so a server of an exported ONNX model needs no PyTorch."""

    name = "exact"
    defaults: Dict[str, Any] = {"query_chunk": None}
    knobs = ("query_chunk",)
    row_arrays = ("vectors",)

    def __init__(self, dim: int, metric: str, params: Dict[str, Any]) -> None:
        self.dim, self.metric = dim, metric
        self.params = {**self.defaults, **_checked_params(self.name, params, self.defaults)}
        self._neighbors = _torch_neighbors()
        self._x = np.zeros((0, dim), np.float32)
        self._parts: List[np.ndarray] = []
        self._sq: Any = None  # |g|^2 for squared_euclidean, made by the next search
        self._lock = threading.Lock()

    def _gallery(self) -> Tuple[np.ndarray, Any]:
        with self._lock:  # batches added since the last search are joined once
            if self._parts:
                self._x, self._parts, self._sq = np.concatenate([self._x, *self._parts]), [], None
            if self._sq is None and self.metric != "cosine":
                if self._neighbors is None:
                    self._sq = np.einsum("ij,ij->i", self._x, self._x)
                else:
                    import torch

                    x = torch.from_numpy(self._x)
                    self._sq = (x * x).sum(1)
            return self._x, self._sq

    @property
    def ntotal(self) -> int:
        return int(self._x.shape[0] + sum(p.shape[0] for p in self._parts))

    def add(self, x: np.ndarray) -> None:
        self._parts.append(np.array(x, np.float32))

    def set_search_params(self, **params: Any) -> None:
        if set(params) - set(self.knobs):
            raise SearchIndexError(f"backend exact: no search parameter {sorted(set(params) - set(self.knobs))} "
                                   "(it is exact; query_chunk sets its memory use)")
        self.params.update(_checked_params(self.name, params, self.defaults))

    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        g, sq = self._gallery()
        n = g.shape[0]
        k = min(k, n)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self._neighbors is not None:
            return self._search_torch(q, g, sq, k)
        step = self.params["query_chunk"] or int(min(4096, max(16, _CHUNK_ELEMENTS // n)))
        scores, rows = [], []
        for r0 in range(0, len(q), step):
            qc = q[r0:r0 + step]
            keys, i = exact_topk(qc, g, sq, k, self.metric)
            if self.metric == "cosine":
                scores.append(-keys)
            else:
                scores.append(np.maximum(keys + np.einsum("ij,ij->i", qc, qc, dtype=np.float64)[:, None], 0))
            rows.append(i)
        return np.concatenate(scores).astype(np.float32), np.concatenate(rows)

    def _search_torch(self, q: np.ndarray, g_np: np.ndarray, sq: Any, k: int) -> Tuple[np.ndarray, np.ndarray]:
        import torch

        nb = self._neighbors
        g, qt = torch.from_numpy(g_np), torch.from_numpy(q)
        n, width = g.shape[0], nb.padded_width(g.shape[0])
        step = self.params["query_chunk"] or nb.default_chunk(width, None)
        keys = torch.empty(min(step, len(qt)), width)
        keys[:, n:] = float("inf")  # columns padded to stable_topk's blocks; the products fill the rest
        scores, rows = [], []
        with torch.no_grad():
            for r0 in range(0, len(qt), step):
                qc = qt[r0:r0 + step]
                chunk = keys[:len(qc)]
                if self.metric == "cosine":  # -<q, g>: one product, written straight into the key rows
                    torch.mm(-qc, g.T, out=chunk[:, :n])
                else:
                    torch.addmm(sq, qc, g.T, alpha=-2.0, out=chunk[:, :n])
                v, i = nb.stable_topk(chunk, k)
                scores.append(-v if self.metric == "cosine" else (v + (qc * qc).sum(1, keepdim=True)).clamp_min_(0))
                rows.append(i)
        return torch.cat(scores).numpy(), torch.cat(rows).numpy()

    def state(self) -> Dict[str, np.ndarray]:
        return {"vectors": self._gallery()[0]}

    def expected(self, count: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        return {"vectors": ("F32", (count, self.dim))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        self._x, self._parts, self._sq = arrays["vectors"], [], None

    def keep(self, mask: np.ndarray) -> None:
        self._x, self._sq = np.ascontiguousarray(self._gallery()[0][mask]), None


def _import_faiss(backend: str) -> Any:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is INFO noise
    try:
        import faiss
    except ImportError:
        raise FaissMissingError(f"backend {backend} needs FAISS, which is not installed: "
                                "pip install 'deepmetric[serve]'") from None
    return faiss


def _flat_vectors(faiss: Any, flat: Any, dim: int) -> np.ndarray:
    """The ``(N, D)`` vectors of an ``IndexFlat`` (a view of FAISS's memory: copy before changing it)."""
    flat = faiss.downcast_index(flat)
    if flat.ntotal == 0:
        return np.zeros((0, dim), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * dim).reshape(-1, dim)


class FaissBackend:
    """What the FAISS backends share: the index is created (and trained, for IVF) on the first ``add``."""

    name = ""
    defaults: Dict[str, Any] = {}
    knobs: Tuple[str, ...] = ()
    row_arrays: Tuple[str, ...] = ("vectors",)

    def __init__(self, dim: int, metric: str, params: Dict[str, Any]) -> None:
        self.faiss = _import_faiss(self.name)
        self.dim, self.metric = dim, metric
        self.params = {**self.defaults, **_checked_params(self.name, params, self.defaults)}
        self._mt = self.faiss.METRIC_INNER_PRODUCT if metric == "cosine" else self.faiss.METRIC_L2
        self.index: Any = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _flat(self) -> Any:
        return self.faiss.IndexFlatIP(self.dim) if self.metric == "cosine" else self.faiss.IndexFlatL2(self.dim)

    def _create(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def _apply_knobs(self) -> None:
        pass

    def add(self, x: np.ndarray) -> None:
        if self.index is None:
            if x.shape[0] == 0:
                return
            self.index = self._create(x)
            if not self.index.is_trained:
                self.index.train(x)
            self._apply_knobs()
        self.index.add(x)

    def set_search_params(self, **params: Any) -> None:
        """Search-time knobs (``knobs``). Changes the index in place: not while searching."""
        unknown = set(params) - set(self.knobs)
        if unknown:
            raise SearchIndexError(f"backend {self.name}: {sorted(unknown)} cannot change at search time "
                                   f"(search parameters: {', '.join(self.knobs) or 'none'})")
        if params.get("refine") and not self.params["refine"] and self.index is not None:
            raise SearchIndexError("faiss-ivfpq: refine must be set when the index is built (--param refine=8)")
        self.params.update(_checked_params(self.name, params, self.defaults))
        if self.index is not None:
            self._apply_knobs()

    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        scores, rows = self.index.search(q, min(k, self.ntotal))
        return scores, rows.astype(np.int64)

    def keep(self, mask: np.ndarray) -> None:
        self.restore({k: (v[mask] if k in self.row_arrays else v) for k, v in self.state().items()})


class FlatBackend(FaissBackend):
    name = "faiss-flat"

    def _create(self, x: np.ndarray) -> Any:
        return self._flat()

    def state(self) -> Dict[str, np.ndarray]:
        return {"vectors": _flat_vectors(self.faiss, self.index, self.dim)}

    def expected(self, count: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        return {"vectors": ("F32", (count, self.dim))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        index = self._flat()
        index.add(arrays["vectors"])
        self.index = index


class IVFBackend(FaissBackend):
    """``IndexIVFFlat``; its file arrays are the coarse centroids, each row's list and the vectors."""

    name = "faiss-ivf"
    defaults: Dict[str, Any] = {"nlist": None, "nprobe": 24}
    knobs: Tuple[str, ...] = ("nprobe",)
    row_arrays: Tuple[str, ...] = ("vectors", "ivf_lists")

    def _nlist(self, n: int) -> int:
        if self.params["nlist"] is None:  # ~4 sqrt(N) lists, each with >= 39 training points (faiss's minimum)
            self.params["nlist"] = int(max(1, min(4 * math.sqrt(n), n // 39)))
        return int(self.params["nlist"])

    def _create(self, x: np.ndarray) -> Any:
        index = self.faiss.IndexIVFFlat(self._flat(), self.dim, self._nlist(x.shape[0]), self._mt)
        # k-means on up to 64 points per list (faiss's default 256 makes 1M-vector builds take many minutes)
        index.cp.max_points_per_centroid = 64
        return index

    def _apply_knobs(self) -> None:
        self.faiss.extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])

    def _ivf_state(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(centroids (nlist, D), list of each row (N,), code of each row (N, code_size) uint8)``."""
        faiss, ivf = self.faiss, self.faiss.extract_index_ivf(self.index)
        n, cs, inv = ivf.ntotal, ivf.code_size, ivf.invlists
        lists, codes = np.empty(n, np.int64), np.empty((n, cs), np.uint8)
        for lst in range(ivf.nlist):
            size = inv.list_size(lst)
            if size:  # the ids FAISS holds are our rows (added in order, never by id)
                rows = faiss.rev_swig_ptr(inv.get_ids(lst), size)
                lists[rows] = lst
                codes[rows] = faiss.rev_swig_ptr(inv.get_codes(lst), size * cs).reshape(size, cs)
        # np.asarray: faiss.contrib.torch_utils (which PyTorch users may import) makes this return a tensor
        return np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist)), lists, codes

    def _ivf_fill(self, ivf: Any, lists: np.ndarray, codes: np.ndarray) -> None:
        """Put each row's code into its list of the trained, empty ``ivf``, rows ascending within a list."""
        if len(lists) and (int(lists.min()) < 0 or int(lists.max()) >= ivf.nlist):
            raise ValueError(f"ivf_lists: list numbers outside 0..{ivf.nlist - 1}")
        if codes.shape[1] != ivf.code_size:
            raise ValueError(f"codes of {codes.shape[1]} bytes, the index uses {ivf.code_size}")
        order = np.argsort(lists, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=ivf.nlist))])
        for lst in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            rows = np.ascontiguousarray(order[bounds[lst]:bounds[lst + 1]])
            block = np.ascontiguousarray(codes[rows])
            ivf.invlists.add_entries(lst, len(rows), self.faiss.swig_ptr(rows), self.faiss.swig_ptr(block))
        ivf.ntotal = len(lists)

    def _trained(self, centroids: np.ndarray, make: Any) -> Any:
        quantizer = self._flat()
        quantizer.add(centroids)
        ivf = make(quantizer)
        ivf.is_trained = True
        return ivf

    def state(self) -> Dict[str, np.ndarray]:
        centroids, lists, codes = self._ivf_state()
        return {"ivf_centroids": centroids, "ivf_lists": lists, "vectors": codes.view("<f4")}

    def expected(self, count: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        return {"ivf_centroids": ("F32", (self.params["nlist"], self.dim)), "ivf_lists": ("I64", (count,)),
                "vectors": ("F32", (count, self.dim))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        ivf = self._trained(arrays["ivf_centroids"], lambda quantizer: self.faiss.IndexIVFFlat(
            quantizer, self.dim, len(arrays["ivf_centroids"]), self._mt))
        self._ivf_fill(ivf, arrays["ivf_lists"], arrays["vectors"].view(np.uint8))
        self.index = ivf
        self._apply_knobs()


class IVFPQBackend(IVFBackend):
    """``IndexIVFPQ`` (in an ``IndexRefineFlat`` with ``refine``); its arrays add the PQ codebooks and codes."""

    name = "faiss-ivfpq"
    defaults = {"nlist": None, "nprobe": 24, "m": None, "nbits": None, "refine": 0}
    knobs = ("nprobe", "refine")

    row_arrays = ("ivf_lists", "pq_codes", "vectors")  # vectors only with refine

    def _create(self, x: np.ndarray) -> Any:
        p, d, n = self.params, self.dim, x.shape[0]
        nlist = self._nlist(n)
        if p["m"] is None:  # bytes per code: the largest divisor of D up to D/4 (and 64)
            p["m"] = max(m for m in range(1, min(64, max(1, d // 4)) + 1) if d % m == 0)
        if d % int(p["m"]):
            raise SearchIndexError(f"faiss-ivfpq: m={p['m']} must divide the vector size {d}")
        if p["nbits"] is None:  # 2^nbits centroids per sub-quantiser, >= 39 training points each
            p["nbits"] = int(max(1, min(8, math.floor(math.log2(max(n / 39, 2))))))
        index = self.faiss.IndexIVFPQ(self._flat(), d, nlist, int(p["m"]), int(p["nbits"]), self._mt)
        index.cp.max_points_per_centroid = 64
        index.pq.cp.max_points_per_centroid = 64  # m small k-means of 2^nbits centroids: 16k points each at most
        if p["refine"]:  # re-rank refine x k PQ candidates with exact distances (keeps raw vectors too)
            index = self.faiss.IndexRefineFlat(index)
        return index

    def _apply_knobs(self) -> None:
        super()._apply_knobs()
        if self.params.get("refine"):
            self.faiss.downcast_index(self.index).k_factor = float(self.params["refine"])

    def state(self) -> Dict[str, np.ndarray]:
        centroids, lists, codes = self._ivf_state()
        pq = self.faiss.downcast_index(self.faiss.extract_index_ivf(self.index)).pq
        out = {"ivf_centroids": centroids, "ivf_lists": lists, "pq_codes": codes,
               "pq_centroids": self.faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)}
        if self.params["refine"]:
            out["vectors"] = _flat_vectors(self.faiss, self.index.refine_index, self.dim)
        return out

    def expected(self, count: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        m, nbits = self.params["m"], self.params["nbits"]
        if m is None or nbits is None or self.dim % m:
            raise ValueError(f"m={m}, nbits={nbits} do not describe a product quantiser of {self.dim}-d vectors")
        out = {"ivf_centroids": ("F32", (self.params["nlist"], self.dim)), "ivf_lists": ("I64", (count,)),
               "pq_codes": ("U8", (count, (m * nbits + 7) // 8)), "pq_centroids": ("F32", (m, 1 << nbits, self.dim // m))}
        if self.params["refine"]:
            out["vectors"] = ("F32", (count, self.dim))
        return out

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        nlist, m, nbits = len(arrays["ivf_centroids"]), int(self.params["m"]), int(self.params["nbits"])
        ivf = self._trained(arrays["ivf_centroids"], lambda quantizer: self.faiss.IndexIVFPQ(
            quantizer, self.dim, nlist, m, nbits, self._mt))
        self.faiss.copy_array_to_vector(np.ascontiguousarray(arrays["pq_centroids"]).ravel(), ivf.pq.centroids)
        ivf.precompute_table()
        self._ivf_fill(ivf, arrays["ivf_lists"], arrays["pq_codes"])
        index = ivf
        if self.params["refine"]:
            vectors = np.ascontiguousarray(arrays["vectors"])
            index = self.faiss.IndexRefineFlat(ivf, self.faiss.swig_ptr(vectors))
        self.index = index
        self._apply_knobs()


class HNSWBackend(FaissBackend):
    """``IndexHNSWFlat``; its arrays are the vectors and the graph (levels, link offsets, links, entry)."""

    name = "faiss-hnsw"
    defaults = {"M": 32, "ef_construction": 64, "ef_search": 96}
    knobs = ("ef_search",)

    def _create(self, x: Optional[np.ndarray]) -> Any:
        index = self.faiss.IndexHNSWFlat(self.dim, int(self.params["M"]), self._mt)
        index.hnsw.efConstruction = int(self.params["ef_construction"])
        return index

    def _apply_knobs(self) -> None:
        self.index.hnsw.efSearch = int(self.params["ef_search"])

    def state(self) -> Dict[str, np.ndarray]:
        h, v2a = self.index.hnsw, self.faiss.vector_to_array
        return {"vectors": _flat_vectors(self.faiss, self.index.storage, self.dim),
                "hnsw_levels": v2a(h.levels), "hnsw_offsets": v2a(h.offsets).astype(np.int64),
                "hnsw_neighbors": v2a(h.neighbors), "hnsw_entry": np.array([h.entry_point, h.max_level], np.int64)}

    def expected(self, count: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        return {"vectors": ("F32", (count, self.dim)), "hnsw_levels": ("I32", (count,)),
                "hnsw_offsets": ("I64", (count + 1,)), "hnsw_neighbors": ("I32", None), "hnsw_entry": ("I64", (2,))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        index = self._create(None)
        h, a2v = index.hnsw, self.faiss.copy_array_to_vector
        levels, offsets, links = arrays["hnsw_levels"], arrays["hnsw_offsets"], arrays["hnsw_neighbors"]
        entry, top = (int(v) for v in arrays["hnsw_entry"])
        _check_hnsw_graph(levels, offsets, links, entry, top, self.faiss.vector_to_array(h.cum_nneighbor_per_level))
        self.faiss.downcast_index(index.storage).add(np.ascontiguousarray(arrays["vectors"]))
        a2v(np.ascontiguousarray(levels), h.levels)
        a2v(offsets.astype(np.uint64), h.offsets)
        a2v(np.ascontiguousarray(links), h.neighbors)
        h.entry_point, h.max_level, index.ntotal = entry, top, len(levels)
        self.index = index
        self._apply_knobs()

    def keep(self, mask: np.ndarray) -> None:
        x = _flat_vectors(self.faiss, self.index.storage, self.dim)[mask]  # a copy
        log.info("faiss-hnsw: removing items rebuilds the graph over the %d remaining vectors", len(x))
        self.index = None
        self.add(x)


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


#: backend name -> class ``(dim, metric, params)``
BACKENDS = {b.name: b for b in (ExactBackend, FlatBackend, IVFBackend, IVFPQBackend, HNSWBackend)}


def make_backend(name: str, dim: int, metric: str, params: Dict[str, Any]):
    try:
        make = BACKENDS[name]
    except KeyError:
        raise SearchIndexError(f"unknown index backend {name!r} (valid: {', '.join(BACKENDS)})") from None
    return make(dim, metric, params)
