"""Search over embeddings: :class:`SearchIndex`, a live gallery with an exact (torch) and four FAISS backends.

| backend | structure | memory per vector | recall | ``add`` | ``remove`` |
|---|---|---|---|---|---|
| ``exact`` | all vectors; chunks of queries ranked by ``stable_topk`` | ``4 D`` bytes | exact | append | drop rows |
| ``faiss-flat`` | ``IndexFlatIP`` / ``IndexFlatL2`` | ``4 D`` bytes | exact | append | drop rows |
| ``faiss-ivf`` | ``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` probed | ``4 D`` bytes | tunable | into the nearest list | drop rows from their lists |
| ``faiss-ivfpq`` | ``IndexIVFPQ``, ``m`` codes of ``nbits``; ``refine=R`` re-ranks ``R k`` exactly | ``m`` (``+4 D``) bytes | lossy | encoded into its list | drop rows from their lists |
| ``faiss-hnsw`` | ``IndexHNSWFlat``, ``M`` links, ``efSearch`` | ``4 D + 8 M`` bytes | tunable | graph insert | rebuilds the graph |

IVF centroids and PQ codebooks are trained on the first ``add`` and kept: later items go into the
existing lists, so a catalogue that drifts far from its first batch is better rebuilt (``index build``).
FAISS has no removal for HNSW graphs, so removing from ``faiss-hnsw`` re-inserts the remaining vectors
(seconds per 100k items; batch removals).

Item ids are stable: ``add`` numbers new items from ``next_id`` on, ``remove`` never renumbers and no id
is ever reused, and hits report that id. Backends work in rows (0..N-1, in id order); the index maps rows
to ids, so the exact backends give exactly what a fresh build over the remaining items gives.

Metrics: ``cosine`` (vectors and queries are L2-normalised, score = inner product, higher is closer)
and ``squared_euclidean`` (score = squared Euclidean distance, lower is closer; ``l2`` is accepted as
its old name). Exact search breaks ties by lower row (= lower id), the rule of
:mod:`deepmetric.evaluation.neighbors`.

Centroid mode (Centroids-ReID, Wieczorek et al. 2021, REFERENCE §4f): one vector per label, the mean of
that label's vectors; for cosine the members are normalised before averaging and the mean is
re-normalised. Unlabelled items (label < 0) have no centroid and are skipped (counted in ``source``).
``add`` folds new members into their label's centroid (the member sums are kept): an updated
centroid is a new item with a new id, the old id retires; new labels get new centroids. ``remove``
takes labels or centroid ids; members cannot be removed one by one (they are not stored).

File format 2 is a `safetensors <https://github.com/huggingface/safetensors>`_ file, readable by any
safetensors reader: arrays ``ids``, ``labels`` (int64), ``path_offsets``/``path_bytes`` and
``class_offsets``/``class_bytes`` (UTF-8 strings), in centroid mode ``counts`` and ``centroid_sums``,
and the backend's own arrays (``vectors``, ``ivf_centroids``, ``ivf_lists``, ``pq_centroids``,
``pq_codes``, ``hnsw_levels``, ``hnsw_offsets``, ``hnsw_neighbors``, ``hnsw_entry``); its metadata
``header`` is JSON (backend, metric, dim, count, next id, mode, params, source, class count, each array's
CRC-32) with a CRC-32 of its own. FAISS indexes are rebuilt from those arrays after they are checked,
never by FAISS's deserialiser, which trusts its input. Loading refuses a container header over 1 MiB
before parsing it, then checks every header field's type and range, every array's dtype and shape
(before reading it), checksum and values: each allocation is bounded by the bytes the file gives it
(Python strings of class names excepted: a small constant more each); anything wrong is an
:class:`IndexFileError` naming the file. Writes are atomic (temporary file in the same folder, fsync,
rename, fsync of the folder) and honour the umask; :func:`edit_index` adds a lock for read-modify-write.
Version 1 files (``DMINDEX`` header) are refused with the command that rebuilds them.

Not thread-safe while changing: ``add``, ``remove`` and ``set_search_params`` must not run during a search.
"""
from __future__ import annotations

import json
import logging
import math
import operator
import os
import secrets
import struct
import threading
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError

log = logging.getLogger("deepmetric")

FORMAT = "deepmetric-index"
FORMAT_VERSION = 2
#: names of ``deepmetric.evaluation.neighbors.DISTANCES`` (tested); not plain ``euclidean``, which ranks as
#: squared does (and FAISS reports squared). Not imported from there: ``deepmetric.evaluation`` imports
#: scikit-learn, which search and serving otherwise never load (the exact backend imports it when made).
METRICS = ("cosine", "squared_euclidean")
METRIC_ALIASES = {"l2": "squared_euclidean"}
MODES = ("items", "centroids")
_V1_MAGIC = b"DMINDEX\0"
_MAX_HEADER = 1 << 20  # container header bytes: array table and JSON header (class names are arrays)
_DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U8": np.dtype("u1")}
_CODES = {v: k for k, v in _DTYPES.items()}
# serial_on_cpu sets torch's process-wide thread count: two searches (server threads) interleaving it could
# leave the process on one thread, so one such section runs at a time (the matrix products stay parallel)
_SERIAL_TOPK = threading.Lock()
#: integer parameters: (lowest, highest) accepted, from the command line or from a file
_PARAM_RANGES = {"query_chunk": (1, 1 << 24), "nlist": (1, 1 << 24), "nprobe": (1, 1 << 24), "m": (1, 4096),
                 "nbits": (1, 16), "refine": (0, 4096), "M": (2, 512), "ef_construction": (1, 1 << 16),
                 "ef_search": (1, 1 << 16)}


class IndexFileError(UserError):
    """A file that is not a readable deepmetric index; the message names the file and what is wrong."""


class SearchIndexError(UserError):
    """A bad argument to an index: unknown backend or metric, wrong vector size, centroids without labels."""


class UnknownItemError(SearchIndexError):
    """An id, path or label that names no item of the index."""


class FaissMissingError(SearchIndexError):
    """A FAISS backend asked for where FAISS is not installed."""


@dataclass(frozen=True)
class Hit:
    """One search result: the item's stable ``id``, ``score`` (cosine similarity, or squared Euclidean
    distance for ``metric="squared_euclidean"``), the stored ``label`` and ``path``, and the label's name."""

    id: int
    score: float
    label: int
    path: Optional[str]
    label_name: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def canonical_metric(name: str) -> str:
    """``name`` as one of :data:`METRICS` (``l2`` is ``squared_euclidean``)."""
    name = METRIC_ALIASES.get(name, name)
    if name not in METRICS:
        raise SearchIndexError(f"unknown metric {name!r} (valid: {', '.join(METRICS)}; 'l2' = squared_euclidean)")
    return name


def _as_matrix(x: Any, dim: Optional[int], what: str) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise SearchIndexError(f"{what}: expected shape (N, {dim or 'D'}), got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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


def _few(values: Sequence[Any], most: int = 8) -> str:
    shown = ", ".join(str(v) for v in list(values)[:most])
    return shown + (f", ... ({len(values) - most} more)" if len(values) > most else "")


class StringTable:
    """Strings (item paths, class names) as one UTF-8 blob and ``(N + 1,)`` int64 offsets (string ``i`` is
    ``blob[offsets[i]:offsets[i + 1]]``; empty reads as None): two arrays, not a Python object per item."""

    def __init__(self, blob: Optional[np.ndarray] = None, offsets: Optional[np.ndarray] = None) -> None:
        self.blob = np.zeros(0, np.uint8) if blob is None else blob
        self.offsets = np.zeros(1, np.int64) if offsets is None else offsets

    @classmethod
    def from_list(cls, strings: Sequence[Optional[str]]) -> "StringTable":
        encoded = [b"" if p is None else str(p).encode("utf-8", "surrogateescape") for p in strings]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Optional[str]:
        i = operator.index(i)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"string {i} of {len(self)}")
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape") or None

    def __iter__(self) -> Iterator[Optional[str]]:
        data, bounds = self.blob.tobytes(), self.offsets.tolist()
        return (data[s:e].decode("utf-8", "surrogateescape") or None for s, e in zip(bounds, bounds[1:]))

    def concat(self, other: "StringTable") -> "StringTable":
        return StringTable(np.concatenate([self.blob, other.blob]),
                           np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]))

    def take(self, rows: np.ndarray) -> "StringTable":
        starts, lengths = self.offsets[:-1][rows], (self.offsets[1:] - self.offsets[:-1])[rows]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return StringTable(self.blob[gather], offsets)

    def check(self) -> None:
        o = self.offsets
        if o[0] != 0 or o[-1] != len(self.blob) or not (o[1:] >= o[:-1]).all():
            raise ValueError("string offsets do not run from 0 to the length of their bytes in order")


# -- backends ----------------------------------------------------------------------------------------
# Each backend stores vectors already prepared for its metric (normalised for cosine) in rows 0..N-1 and
# answers search(queries, k) -> (scores (Q, k), rows (Q, k)), best first, rows -1 where fewer than k exist.
# state() gives its arrays for the file, restore() rebuilds it from checked arrays (expected() says their
# dtypes and shapes), keep(mask) drops the rows where mask is False, the others keeping their order.


class ExactBackend:
    """All vectors in one float32 tensor. Search ranks chunks of queries by the ranking keys of
    :mod:`deepmetric.evaluation.neighbors` (``-<q, g>`` for cosine, ``|g|^2 - 2<q, g>`` squared Euclidean)
    with its ``stable_topk``: the same order and tie rule as the evaluation, memory ``query_chunk x N``."""

    name = "exact"
    defaults: Dict[str, Any] = {"query_chunk": None}
    knobs = ("query_chunk",)
    row_arrays = ("vectors",)

    def __init__(self, dim: int, metric: str, params: Dict[str, Any]) -> None:
        from ..evaluation import neighbors

        self._neighbors = neighbors
        self.dim, self.metric = dim, metric
        self.params = {**self.defaults, **_checked_params(self.name, params, self.defaults)}
        self._x = torch.empty(0, dim)
        self._parts: List[torch.Tensor] = []
        self._sq: Optional[torch.Tensor] = None  # |g|^2 for squared_euclidean, made by the next search
        self._lock = threading.Lock()

    def _gallery(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        with self._lock:  # batches added since the last search are joined once
            if self._parts:
                self._x, self._parts, self._sq = torch.cat([self._x, *self._parts]), [], None
            if self._sq is None and self.metric != "cosine":
                self._sq = (self._x * self._x).sum(1)
            return self._x, self._sq

    @property
    def ntotal(self) -> int:
        return int(self._x.shape[0] + sum(p.shape[0] for p in self._parts))

    def add(self, x: np.ndarray) -> None:
        self._parts.append(torch.from_numpy(x.copy()))

    def set_search_params(self, **params: Any) -> None:
        if set(params) - set(self.knobs):
            raise SearchIndexError(f"backend exact: no search parameter {sorted(set(params) - set(self.knobs))} "
                                   "(it is exact; query_chunk sets its memory use)")
        self.params.update(_checked_params(self.name, params, self.defaults))

    @torch.no_grad()
    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        g, sq = self._gallery()
        n, width = g.shape[0], self._neighbors.padded_width(g.shape[0])
        k = min(k, n)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        qt = torch.from_numpy(q)
        step = self.params["query_chunk"] or self._neighbors.default_chunk(width, None)
        keys = torch.empty(min(step, len(qt)), width)
        keys[:, n:] = float("inf")  # columns padded to stable_topk's blocks; the products fill the rest
        scores, rows = [], []
        for r0 in range(0, len(qt), step):
            qc = qt[r0:r0 + step]
            chunk = keys[:len(qc)]
            if self.metric == "cosine":  # -<q, g>: one product, written straight into the key rows
                torch.mm(-qc, g.T, out=chunk[:, :n])
            else:
                torch.addmm(sq, qc, g.T, alpha=-2.0, out=chunk[:, :n])
            with _SERIAL_TOPK, self._neighbors.serial_on_cpu(chunk.device):  # its many small ops: 1 thread
                v, i = self._neighbors.stable_topk(chunk, k)
            scores.append(-v if self.metric == "cosine" else (v + (qc * qc).sum(1, keepdim=True)).clamp_min_(0))
            rows.append(i)
        return torch.cat(scores).numpy(), torch.cat(rows).numpy()

    def state(self) -> Dict[str, np.ndarray]:
        return {"vectors": self._gallery()[0].numpy()}

    def expected(self, count: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        return {"vectors": ("F32", (count, self.dim))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        self._x, self._parts, self._sq = torch.from_numpy(arrays["vectors"]), [], None

    def keep(self, mask: np.ndarray) -> None:
        self._x, self._sq = self._gallery()[0][torch.from_numpy(mask)].contiguous(), None


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
        return ivf.quantizer.reconstruct_n(0, ivf.nlist), lists, codes

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


def _make_backend(name: str, dim: int, metric: str, params: Dict[str, Any]):
    try:
        make = BACKENDS[name]
    except KeyError:
        raise SearchIndexError(f"unknown index backend {name!r} (valid: {', '.join(BACKENDS)})") from None
    return make(dim, metric, params)


# -- centroids ---------------------------------------------------------------------------------------

def _member_sums(x: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label of ``labels`` (all >= 0): ``(labels (C,), first member (C,), sums (C, D) float64, counts (C,))``."""
    uniq, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    sums = np.zeros((len(uniq), x.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, x)
    return uniq.astype(np.int64), first, sums, counts.astype(np.int64)


def _centroid_vectors(sums: np.ndarray, counts: np.ndarray, metric: str) -> np.ndarray:
    cent = sums / counts[:, None]
    return (_l2_normalize(cent) if metric == "cosine" else cent).astype(np.float32)


def _labelled(labels: np.ndarray) -> np.ndarray:
    keep = np.flatnonzero(labels >= 0)
    if not len(keep):
        raise SearchIndexError("centroid mode needs labels: every item is unlabelled (-1); embed a folder "
                               "with one subfolder per class, or a list file with labels")
    return keep


def label_centroids(vectors: Any, labels: Sequence[int], paths: Optional[Sequence[Optional[str]]] = None,
                    metric: str = "cosine"):
    """One vector per label: ``(centroids (C, D) float32, labels (C,) int64, paths, counts (C,) int64)``.

    The mean of each label's vectors (members L2-normalised first and the mean re-normalised for
    ``cosine``); ``paths`` holds each label's first member (a picture to show for the centroid).
    Labels < 0 (unlabelled) are skipped.
    """
    metric = canonical_metric(metric)
    x = _as_matrix(vectors, None, "centroids")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    idx = _labelled(labels)
    uniq, first, sums, counts = _member_sums(_l2_normalize(x[idx]) if metric == "cosine" else x[idx], labels[idx])
    rep = None if paths is None else [paths[i] for i in idx[first]]
    return _centroid_vectors(sums, counts, metric), uniq, rep, counts


# -- the index -----------------------------------------------------------------------------------------

class SearchIndex:
    """Vectors plus per-item metadata (stable id, label, path), searchable by ``search(queries, k)``.

    >>> idx = SearchIndex(dim=2, metric="cosine")
    >>> idx.add([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], labels=[7, 8, 9], paths=["a.jpg", "b.jpg", "c.jpg"]).tolist()
    [0, 1, 2]
    >>> idx.remove(ids=[0]).tolist(), idx.add([[1.0, 0.1]], labels=[7]).tolist()
    ([0], [3])
    >>> [(h.id, round(h.score, 3), h.label) for h in idx.search([[1.0, 0.0]], k=2)[0]]
    [(3, 0.995, 7), (2, 0.707, 9)]
    """

    def __init__(self, dim: int, metric: str = "cosine", backend: str = "exact", *, mode: str = "items",
                 class_names: Optional[Sequence[str]] = None, source: Optional[Dict[str, Any]] = None,
                 **params: Any) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise SearchIndexError(f"dim must be a positive integer, got {dim!r}")
        if mode not in MODES:
            raise SearchIndexError(f"unknown index mode {mode!r} (valid: {', '.join(MODES)})")
        self.dim, self.metric, self.backend_name, self.mode = int(dim), canonical_metric(metric), backend, mode
        self.backend = _make_backend(backend, self.dim, self.metric, dict(params))
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.source: Dict[str, Any] = dict(source or {})
        self.next_id = 0
        self._ids = np.zeros(0, np.int64)
        self._labels = np.zeros(0, np.int64)
        self._paths = StringTable()
        centroids = mode == "centroids"
        self.counts: Optional[np.ndarray] = np.zeros(0, np.int64) if centroids else None  # members per centroid
        self._sums: Optional[np.ndarray] = np.zeros((0, self.dim), np.float32) if centroids else None

    @classmethod
    def build(cls, embeddings, backend: str = "exact", metric: str = "cosine", centroids: bool = False,
              class_names: Optional[Sequence[str]] = None, source: Optional[Dict[str, Any]] = None,
              **params: Any) -> "SearchIndex":
        """An index over an :class:`~deepmetric.inference.EmbeddingSet` (one vector per item, or per label)."""
        index = cls(embeddings.dim, metric, backend, mode="centroids" if centroids else "items",
                    class_names=class_names, source=source, **params)
        index.add(embeddings.vectors, embeddings.labels, embeddings.paths)
        return index

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` int64 stable item ids, ascending (row ``i`` holds item ``ids[i]``)."""
        return self._ids

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` int64 per row, -1 for unlabelled items."""
        return self._labels

    @property
    def paths(self) -> StringTable:
        """The path per row (``None`` where unknown)."""
        return self._paths

    def path_of(self, item_id: int) -> Optional[str]:
        """The stored path of item ``item_id`` (a stable id); :class:`UnknownItemError` if there is none."""
        return self._paths[int(self._rows_of_ids([item_id])[0])]

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        return _l2_normalize(x) if self.metric == "cosine" else x

    def add(self, vectors: Any, labels: Optional[Sequence[int]] = None,
            paths: Optional[Sequence[Optional[str]]] = None,
            class_names: Optional[Sequence[str]] = None) -> np.ndarray:
        """Add ``(N, D)`` vectors with their labels (default -1) and paths (default None); returns the new ids.

        With ``class_names`` the labels index those names and are mapped to the index's own (names it
        lacks are appended); without, they are taken as the index's labels. In centroid mode the vectors
        are members: their labels' centroids are recomputed (see the module docstring).
        """
        x = _as_matrix(vectors, self.dim, "SearchIndex.add")
        n = x.shape[0]
        lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        pth = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        if len(lab) != n or len(pth) != n:
            raise SearchIndexError(f"SearchIndex.add: {n} vectors but {len(lab)} labels and {len(pth)} paths")
        if len(lab) and int(lab.min()) < -1:
            raise SearchIndexError(f"SearchIndex.add: label {int(lab.min())}; labels are >= 0, or -1 for unlabelled")
        names = self.class_names
        if class_names is not None:
            lab, names = self._map_labels(lab, [str(c) for c in class_names])
        if self.mode == "centroids":
            ids = self._add_members(self._prepare(x), lab, pth)
        else:
            ids = self._append(self._prepare(x), lab, StringTable.from_list(pth))
        self.class_names = names
        return ids

    def _map_labels(self, lab: np.ndarray, names: List[str]) -> Tuple[np.ndarray, List[str]]:
        if len(lab) and int(lab.max()) >= len(names):
            raise SearchIndexError(f"label {int(lab.max())} has no class name (there are {len(names)})")
        if self.class_names is None and (self._labels >= 0).any():
            raise SearchIndexError("the index has labels but no class names (built from a list file), so labels "
                                   "named by class cannot be matched to its own; add embeddings of a list file")
        own = list(self.class_names or [])
        position = {c: i for i, c in enumerate(own)}
        for c in names:
            if c not in position:
                position[c] = len(own)
                own.append(c)
        mapping = np.array([position[c] for c in names] + [-1], np.int64)  # label -1 reads the last entry
        return mapping[lab], own

    def _append(self, x: np.ndarray, lab: np.ndarray, paths: StringTable, counts: Optional[np.ndarray] = None,
                sums: Optional[np.ndarray] = None) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + len(x), dtype=np.int64)
        self.backend.add(x)
        self._ids, self._labels = np.concatenate([self._ids, ids]), np.concatenate([self._labels, lab])
        self._paths = self._paths.concat(paths)
        if counts is not None:
            self.counts = np.concatenate([self.counts, counts])
            self._sums = np.concatenate([self._sums, sums.astype(np.float32)])
        self.next_id += len(x)
        return ids

    def _add_members(self, x: np.ndarray, lab: np.ndarray, pth: List[Optional[str]]) -> np.ndarray:
        idx = _labelled(lab)
        if len(idx) < len(lab):
            self.source["unlabelled_skipped"] = int(self.source.get("unlabelled_skipped", 0)) + len(lab) - len(idx)
            log.warning("centroid index: %d unlabelled vectors have no centroid and were skipped", len(lab) - len(idx))
        uniq, first, sums, counts = _member_sums(x[idx], lab[idx])
        row = {int(label): r for r, label in enumerate(self._labels.tolist())}
        old = np.array([row.get(int(label), -1) for label in uniq], np.int64)
        hit = old >= 0
        sums[hit] += self._sums[old[hit]]
        counts[hit] += self.counts[old[hit]]
        paths = [self._paths[r] if r >= 0 else pth[i] for r, i in zip(old.tolist(), idx[first].tolist())]
        if hit.any():  # updated centroids are new items: the old ids retire
            self._drop_rows(old[hit])
        return self._append(_centroid_vectors(sums, counts, self.metric), uniq, StringTable.from_list(paths),
                            counts, sums)

    def remove(self, ids: Optional[Sequence[int]] = None, paths: Optional[Sequence[str]] = None,
               labels: Optional[Sequence[Any]] = None) -> np.ndarray:
        """Remove items by stable id, by path (as stored, or its absolute form) or by label (a number or a
        class name); any combination removes their union. Returns the removed ids, ascending.

        Raises :class:`UnknownItemError` naming what matches no item, and refuses to empty the index.
        """
        if ids is None and paths is None and labels is None:
            raise SearchIndexError("remove: name the items to remove by ids, paths or labels")
        drop = np.zeros(len(self), bool)
        if ids is not None:
            drop[self._rows_of_ids(ids)] = True
        if paths is not None:
            drop |= self._rows_of_paths(paths)
        if labels is not None:
            drop |= np.isin(self._labels, self._label_values(labels))
        if drop.all():
            raise SearchIndexError(f"remove: that would remove all {len(self)} items, and an index needs at "
                                   "least one; build a new index instead")
        removed = self._ids[drop]
        if len(removed):
            self._drop_rows(np.flatnonzero(drop))
        return removed

    def _rows_of_ids(self, ids: Sequence[int]) -> np.ndarray:
        want = np.asarray(ids).reshape(-1)
        if want.size and want.dtype.kind not in "iu":
            raise SearchIndexError(f"item ids must be integers, got {_few(want.tolist())}")
        pos = np.minimum(np.searchsorted(self._ids, want), max(len(self) - 1, 0))
        found = (self._ids[pos] == want) if len(self) else np.zeros(len(want), bool)
        if not found.all():
            span = f"ids {self._ids[0]}..{self._ids[-1]}, " if len(self) else ""
            raise UnknownItemError(f"no item with id {_few(want[~found].tolist())} in the index ({span}{len(self)} "
                                   "items; ids of removed items are never reused)")
        return pos

    def _rows_of_paths(self, paths: Sequence[str]) -> np.ndarray:
        if self.mode == "centroids":
            raise SearchIndexError("a centroid index does not keep its members, so it cannot remove them by path; "
                                   "remove whole centroids by labels or ids, or rebuild it from the embeddings")
        want = {str(p) for p in paths} | {os.path.abspath(p) for p in paths}
        drop = np.array([p in want for p in self._paths], bool)
        stored = {p for p in self._paths if p in want}
        missing = [p for p in paths if str(p) not in stored and os.path.abspath(p) not in stored]
        if missing:
            raise UnknownItemError(f"no item with path {_few(missing, 3)} in the index")
        return drop

    def _label_values(self, labels: Sequence[Any]) -> np.ndarray:
        names = {c: i for i, c in enumerate(self.class_names or [])}
        values, unknown = [], []
        for label in labels:
            if isinstance(label, str) and label in names:
                values.append(names[label])
            elif isinstance(label, (int, np.integer, str)) and not isinstance(label, bool) and \
                    str(label).lstrip("-").isdigit():
                values.append(int(label))
            else:
                unknown.append(label)
        present = set(self._labels.tolist())
        unknown += [v for v in values if v not in present]
        if unknown:
            raise UnknownItemError(f"no item has label {_few(unknown, 5)}"
                                   + (f" (class names: {_few(self.class_names, 5)})" if self.class_names else ""))
        return np.asarray(values, np.int64)

    def _drop_rows(self, rows: np.ndarray) -> None:
        mask = np.ones(len(self), bool)
        mask[rows] = False
        self.backend.keep(mask)
        kept = np.flatnonzero(mask)
        self._ids, self._labels, self._paths = self._ids[kept], self._labels[kept], self._paths.take(kept)
        if self.counts is not None:
            self.counts, self._sums = self.counts[kept], self._sums[kept]

    def set_search_params(self, **params: Any) -> None:
        """Speed/recall knobs: ``nprobe`` (faiss-ivf, faiss-ivfpq), ``ef_search`` (faiss-hnsw)."""
        self.backend.set_search_params(**params)

    def _search_rows(self, queries: Any, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise SearchIndexError(f"search: k must be >= 1, got {k}")
        q = _as_matrix(queries, self.dim, "SearchIndex.search queries")
        if len(q) == 0:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
        return self.backend.search(self._prepare(q), int(k))

    def search_arrays(self, queries: Any, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k'), ids (Q, k'))`` best first, ``k' = min(k, len(self))``; ids -1 mark missing hits."""
        scores, rows = self._search_rows(queries, k)
        return scores, np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)

    def search(self, queries: Any, k: int = 10) -> List[List[Hit]]:
        """The ``k`` nearest items of each query ``(Q, D)`` (or one ``(D,)`` vector), best first."""
        scores, rows = self._search_rows(queries, k)
        names = self.class_names
        out = []
        for srow, rrow in zip(scores.tolist(), rows.tolist()):
            hits = []
            for s, r in zip(srow, rrow):
                if r < 0:
                    continue
                lab = int(self._labels[r])
                name = names[lab] if names is not None and 0 <= lab < len(names) else None
                hits.append(Hit(int(self._ids[r]), float(s), lab, self._paths[r], name))
            out.append(hits)
        return out

    def info(self) -> Dict[str, Any]:
        """What the index is: backend, metric, dim, count, next id, mode, parameters and source."""
        return {"backend": self.backend_name, "metric": self.metric, "dim": self.dim, "count": len(self),
                "next_id": self.next_id, "mode": self.mode, "params": dict(self.backend.params),
                "source": self.source}

    # -- files ----------------------------------------------------------------------------------------

    def arrays(self) -> Dict[str, np.ndarray]:
        """Everything the file holds, as named arrays (rows in id order)."""
        names = StringTable.from_list(self.class_names or [])
        out = {"ids": self._ids, "labels": self._labels, "path_offsets": self._paths.offsets,
               "path_bytes": self._paths.blob, "class_offsets": names.offsets, "class_bytes": names.blob}
        if self.counts is not None:
            out.update(counts=self.counts, centroid_sums=self._sums)
        return {**out, **self.backend.state()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one file atomically (see the module docstring for the format)."""
        from .. import __version__

        path = Path(path)
        if len(self) == 0:
            raise SearchIndexError(f"{path}: refusing to save an empty index")
        arrays = {k: np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<"), copy=False)
                  for k, v in self.arrays().items()}
        header = json.dumps({**self.info(), "class_count": None if self.class_names is None else len(self.class_names),
                             "written_by": f"deepmetric {__version__}",
                             "crc32": {k: zlib.crc32(memoryview(v).cast("B")) for k, v in arrays.items()}})
        if len(header) > _MAX_HEADER // 2:
            raise SearchIndexError(f"{path}: the index's source and parameters are too long to save "
                                   f"({len(header)} characters of JSON)")
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "header": header, "header_crc32": str(_crc_text(header))}
        _atomic_write(path, lambda f: _write_safetensors(f, arrays, meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchIndex":
        """Read a file written by :meth:`save`; :class:`IndexFileError` names the file if it is not one."""
        path = Path(path)
        _check_file_start(path)
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:
            raise SearchIndexError(f"{path}: reading an index needs the safetensors package, which is not installed: "
                                   "pip install 'deepmetric[train]'") from None
        try:
            with safe_open(str(path), framework="numpy") as f:
                h = _parse_header(f.metadata() or {})
                index = cls(h["dim"], h["metric"], h["backend"], mode=h["mode"], source=h["source"], **h["params"])
                arrays = _read_arrays(f, h, _expected_arrays(h, index.backend))
            index._restore(h, arrays)
        except SafetensorError as e:
            raise IndexFileError(f"{path}: not a valid index file; it is truncated or damaged (safetensors: "
                                 f"{_line(e)}); rebuild it with 'deepmetric index build'") from None
        except FaissMissingError as e:
            raise FaissMissingError(f"{path}: {e}") from None
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as e:
            # _Bad (our checks), SearchIndexError (a bad parameter), faiss's RuntimeError, numpy's errors
            raise IndexFileError(f"{path}: {'' if isinstance(e, _Bad) else 'not a valid index: '}{_line(e)}") from None
        return index

    def _restore(self, h: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> None:
        """Fill a new index from a file's checked arrays (their values are checked here)."""
        ids, labels = arrays["ids"], arrays["labels"]
        if len(ids) and (int(ids[0]) < 0 or not (ids[1:] > ids[:-1]).all() or int(ids[-1]) >= h["next_id"]):
            raise ValueError("ids are not ascending, or not below next_id")
        if int(labels.min(initial=0)) < -1 or (h["mode"] == "centroids" and (
                int(labels.min(initial=0)) < 0 or len(np.unique(labels)) != len(labels))):
            raise ValueError("labels below -1, or centroid labels that are not distinct")
        paths, names = (StringTable(arrays[f"{k}_bytes"], arrays[f"{k}_offsets"]) for k in ("path", "class"))
        paths.check()
        names.check()
        self.class_names = None if h["class_count"] is None else [c or "" for c in names]
        if h["mode"] == "centroids":
            if int(arrays["counts"].min(initial=1)) < 1:
                raise ValueError("a centroid of no members")
            self.counts, self._sums = arrays["counts"], arrays["centroid_sums"]
        self.backend.restore(arrays)
        self._ids, self._labels, self._paths, self.next_id = ids, labels, paths, h["next_id"]


# -- the file ------------------------------------------------------------------------------------------

def _write_safetensors(f, arrays: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """A safetensors file: 8-byte little-endian header length, JSON header (padded to 8 bytes), data."""
    entries, offset = {}, 0
    for name, arr in arrays.items():
        entries[name] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    head = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)) + head)
    for arr in arrays.values():
        f.write(memoryview(arr).cast("B"))


def _atomic_write(path: Path, write) -> None:
    """Write through a new sibling (mode 0o666 less the umask, like any file the user creates), fsync it,
    rename it over ``path`` and fsync the folder: a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _crc_text(text: str) -> int:
    """CRC-32 of ``text`` in UTF-8, encoded 16 KiB at a time (no second copy of a long header)."""
    crc = 0
    for i in range(0, len(text), 1 << 14):
        crc = zlib.crc32(text[i:i + (1 << 14)].encode("utf-8", "surrogateescape"), crc)
    return crc


class _Bad(ValueError):
    """A malformed index file (the loader adds the file's name)."""


def _field(h: Dict[str, Any], key: str, kind: Any, lo: int = 0, hi: int = 1 << 62) -> Any:
    value = h.get(key)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _Bad(f"header field {key!r} must be an integer from {lo} to {hi}, got {value!r}"[:200])
    elif not isinstance(value, kind):
        raise _Bad(f"header field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _parse_header(meta: Dict[str, str]) -> Dict[str, Any]:
    """The checked header of a format-2 file's metadata: every field's type and range."""
    if meta.get("format") != FORMAT:
        raise _Bad("a safetensors file, but not a deepmetric index (its metadata has no format=deepmetric-index)")
    version = meta.get("version", "")
    if not version.isdigit() or int(version) != FORMAT_VERSION:
        newer = version.isdigit() and int(version) > FORMAT_VERSION
        raise _Bad(f"index format version {version[:20]!r} is " + (
            f"newer than this deepmetric reads ({FORMAT_VERSION}); upgrade deepmetric" if newer else "unknown"))
    text = meta.get("header", "")
    if meta.get("header_crc32") != str(_crc_text(text)):
        raise _Bad("the header fails its checksum (corrupt file)")
    h = json.loads(text)
    if not isinstance(h, dict):
        raise _Bad("the header is not a JSON object")
    if _field(h, "backend", str) not in BACKENDS:
        raise _Bad(f"unknown backend {h['backend'][:40]!r}")
    _field(h, "metric", str)
    if _field(h, "mode", str) not in MODES:
        raise _Bad(f"unknown mode {h['mode'][:40]!r}")
    _field(h, "dim", int, 1, 1 << 20)
    _field(h, "count", int, 1, 1 << 40)
    _field(h, "next_id", int, h["count"])
    for key in ("params", "source", "crc32"):
        _field(h, key, dict)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in h["crc32"].values()):
        raise _Bad("header field 'crc32' must map array names to CRC-32 values")
    if h.get("class_count") is not None:
        _field(h, "class_count", int, 0, 1 << 40)
    h.setdefault("class_count", None)
    return h


def _expected_arrays(h: Dict[str, Any], backend: Any) -> Dict[str, Tuple[str, Optional[tuple]]]:
    n = h["count"]
    classes = 0 if h["class_count"] is None else h["class_count"]
    out = {"ids": ("I64", (n,)), "labels": ("I64", (n,)), "path_offsets": ("I64", (n + 1,)), "path_bytes": ("U8", None),
           "class_offsets": ("I64", (classes + 1,)), "class_bytes": ("U8", None)}
    if h["mode"] == "centroids":
        out.update(counts=("I64", (n,)), centroid_sums=("F32", (n, h["dim"])))
    return {**out, **backend.expected(n)}


def _v1_message(path: Path, size: int) -> str:
    """Why a format-1 file is refused, with the command that rebuilds it (its header names the embeddings)."""
    embeddings = "FEATURES.npz"
    with open(path, "rb") as f:
        f.seek(12)
        hlen = int.from_bytes(f.read(8), "little")
        if 0 < hlen <= min(size - 20, 1 << 24):
            try:
                named = json.loads(f.read(hlen).decode()).get("source", {}).get("embeddings")
                embeddings = named if isinstance(named, str) and named.isprintable() else embeddings
            except (ValueError, AttributeError):
                pass
    return (f"{path}: an index in format 1 (deepmetric before the live gallery), which this version no longer "
            f"reads; rebuild it: deepmetric index build --embeddings {embeddings} --output {path}")


def _line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _check_file_start(path: Path) -> None:
    """Refuse a missing, foreign, format-1 or visibly truncated file before the container is opened."""
    if not path.is_file():
        raise IndexFileError(f"index file not found: {path}" if not path.exists()
                             else f"{path}: is not a file (expected an index written by 'deepmetric index build')")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:8] == _V1_MAGIC:
        raise IndexFileError(_v1_message(path, size))
    if len(head) < 9 or head[8:9] != b"{":
        raise IndexFileError(f"{path}: not a deepmetric index file (not a safetensors container); "
                             "build one with 'deepmetric index build'")
    length = int.from_bytes(head[:8], "little")
    if 8 + length > size:
        raise IndexFileError(f"{path}: truncated index file ({size} bytes, shorter than its own header); "
                             "rebuild it with 'deepmetric index build'")
    if length > _MAX_HEADER:  # before any parsing: JSON objects outgrow their text
        raise IndexFileError(f"{path}: not a deepmetric index file (a {length}-byte header; deepmetric writes "
                             f"at most {_MAX_HEADER})")


def _read_arrays(f: Any, h: Dict[str, Any], expected: Dict[str, Tuple[str, Optional[tuple]]]) -> Dict[str, np.ndarray]:
    """The arrays of an open safetensors file: names, dtypes and shapes checked before any data is read,
    then each array's CRC-32."""
    names = set(f.keys())
    if names != set(expected) or set(h["crc32"]) != names:
        raise _Bad(f"its arrays {_few(sorted(names))} are not the {h['backend']} backend's "
                   f"{_few(sorted(expected))}, or not those of its checksum table")
    for name, (dtype, shape) in expected.items():
        got = f.get_slice(name)
        got_dtype, got_shape = got.get_dtype(), tuple(got.get_shape())
        if got_dtype != dtype or (got_shape != shape if shape is not None else len(got_shape) != 1):
            raise _Bad(f"array {name!r} is {got_dtype} {list(got_shape)}, expected {dtype} "
                       f"{list(shape) if shape is not None else '[n]'}")
    arrays = {}
    for name in expected:
        arr = f.get_tensor(name)
        if zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) != h["crc32"][name]:
            raise _Bad(f"array {name!r} fails its checksum (corrupt file); rebuild the index")
        arrays[name] = arr
    return arrays


@contextmanager
def edit_index(path: str | os.PathLike) -> Iterator[SearchIndex]:
    """Load the index at ``path``, yield it for changes and save it atomically when the block ends without
    an error. An exclusive lock on a sidecar ``.NAME.lock`` file (POSIX) serialises concurrent edits, so
    two ``deepmetric index add`` runs cannot lose each other's items."""
    path = Path(path)
    if not path.is_file():
        SearchIndex.load(path)  # raises the error that says what is there instead
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; each save is still atomic
        fcntl = None
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        index = SearchIndex.load(path)
        yield index
        index.save(path)
