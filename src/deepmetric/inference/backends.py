"""The search index's backends: their interface, and exact search (the FAISS structures are in
:mod:`deepmetric.inference.faiss_backends`).

Each backend stores vectors already prepared for its metric (normalised for cosine) in rows 0..N-1 and
answers ``search(queries, k) -> (scores (Q, k), rows (Q, k))``, best first, rows -1 where fewer than k
exist. ``state()`` gives its arrays for the file, ``restore()`` rebuilds it from checked arrays
(``expected(count, slots)`` says their dtypes and shapes), ``keep(mask)`` drops the rows where mask is
False, the others keeping their order. ``slots`` is the rows a backend stores: ``ntotal`` for all but
``faiss-hnsw``, which keeps removed rows in its graph as tombstones until it is compacted
(``compaction()``; None where there is nothing to compact). The table of what each costs is in
:mod:`deepmetric.inference.index`.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import UserError

#: integer parameters: (lowest, highest) accepted, from the command line or from a file
_PARAM_RANGES = {"query_chunk": (1, 1 << 24), "nlist": (1, 1 << 24), "nprobe": (1, 1 << 24), "m": (1, 4096),
                 "nbits": (1, 16), "refine": (0, 4096), "M": (2, 512), "ef_construction": (1, 1 << 16),
                 "ef_search": (1, 1 << 16), "on_disk": (0, 1)}
#: query rows per chunk of exact search by default: about 16M scores (64 MB of float32) at once
_CHUNK_ELEMENTS = 1 << 24


class SearchIndexError(UserError):
    """A bad argument to an index: unknown backend or metric, wrong vector size, centroids without labels."""


class FaissMissingError(SearchIndexError):
    """A FAISS backend asked for where FAISS is not installed."""


def checked_params(backend: str, params: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """``params`` of ``backend``, each a known name (``defaults``) holding an integer in its range."""
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


def no_tombstones(backend: str, count: int, slots: int) -> None:
    """Refuse a file that claims removed rows for a backend that keeps none."""
    if slots != count:
        raise ValueError(f"{slots} stored rows for {count} items, but {backend} keeps no removed rows")


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
        self.params = {**self.defaults, **checked_params(self.name, params, self.defaults)}
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

    slots = ntotal

    def compaction(self, force: bool = False) -> None:
        return None

    def add(self, x: np.ndarray) -> None:
        self._parts.append(np.array(x, np.float32))

    def set_search_params(self, **params: Any) -> None:
        if set(params) - set(self.knobs):
            raise SearchIndexError(f"backend exact: no search parameter {sorted(set(params) - set(self.knobs))} "
                                   "(it is exact; query_chunk sets its memory use)")
        self.params.update(checked_params(self.name, params, self.defaults))

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

    def expected(self, count: int, slots: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        no_tombstones(self.name, count, slots)
        return {"vectors": ("F32", (count, self.dim))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        self._x, self._parts, self._sq = arrays["vectors"], [], None

    def keep(self, mask: np.ndarray) -> None:
        self._x, self._sq = np.ascontiguousarray(self._gallery()[0][mask]), None
