"""Search over embeddings: :class:`SearchIndex`, with an exact (torch) and four FAISS backends.

| backend | structure | build | memory per vector | recall |
|---|---|---|---|---|
| ``exact`` | all vectors, chunked matmul + running top-k | none | ``4 D`` bytes | exact |
| ``faiss-flat`` | ``IndexFlatIP`` / ``IndexFlatL2`` | none | ``4 D`` bytes | exact |
| ``faiss-ivf`` | ``IndexIVFFlat``, ``nlist`` inverted lists, ``nprobe`` probed | k-means | ``4 D`` bytes | tunable |
| ``faiss-ivfpq`` | ``IndexIVFPQ``, ``m`` sub-quantisers of ``nbits`` bits | k-means + PQ | ``m`` bytes | lossy; ``refine=R`` re-ranks ``R k`` candidates exactly (``+4 D`` bytes) |
| ``faiss-hnsw`` | ``IndexHNSWFlat``, graph of ``M`` links, ``efSearch`` | graph insert | ``4 D + 8 M`` bytes | tunable |

Metrics: ``cosine`` (vectors and queries are L2-normalised, score = inner product, higher is closer)
and ``l2`` (score = *squared* Euclidean distance, lower is closer). Hits come back best first either way.

Centroid mode (Centroids-ReID, Wieczorek et al. 2021, REFERENCE §4f): one vector per label, the mean of
that label's vectors; for cosine the members are normalised before averaging and the mean is
re-normalised. Unlabelled items (label < 0) have no centroid and are left out (counted in ``info``).

File format (one file, written atomically)::

    b"DMINDEX\\0" | version: uint32 LE | header length: uint64 LE | header (UTF-8 JSON) | sections

The header holds backend, metric, dim, count, parameters, class names and a table of sections
(``labels`` int64, ``paths`` JSON, ``counts`` int64 for centroids, ``vectors`` float32 for exact or
``faiss`` serialised index bytes), each with its byte length and CRC-32. A foreign, truncated or
corrupt file raises :class:`IndexFileError` naming the file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError

log = logging.getLogger("deepmetric")

MAGIC = b"DMINDEX\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
METRICS = ("cosine", "l2")


class IndexFileError(UserError):
    """A file that is not a readable deepmetric index; the message names the file and what is wrong."""


class SearchIndexError(UserError):
    """A bad argument to an index: unknown backend or metric, wrong vector size, centroids without labels."""


@dataclass(frozen=True)
class Hit:
    """One search result: gallery ``id`` (row of the index), ``score`` (cosine similarity, or squared
    L2 distance for ``metric="l2"``), the stored ``label`` and ``path``, and the label's name if known."""

    id: int
    score: float
    label: int
    path: Optional[str]
    label_name: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


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


# -- backends ----------------------------------------------------------------------------------------
# Each backend stores vectors already prepared for its metric (normalised for cosine) and answers
# search(queries, k) -> (scores (Q, k), ids (Q, k)), best first, ids -1 where fewer than k exist.


class ExactBackend:
    """All vectors in one float32 tensor; search is chunked ``Q x G`` matmul with a running top-k, so
    memory stays ``query_chunk x gallery_chunk`` whatever the gallery size."""

    name = "exact"

    def __init__(self, dim: int, metric: str, params: Dict[str, Any]) -> None:
        unknown = set(params) - {"query_chunk", "gallery_chunk"}
        if unknown:
            raise SearchIndexError(f"backend exact: unknown parameter(s) {sorted(unknown)} "
                                   "(valid: query_chunk, gallery_chunk)")
        self.dim, self.metric = dim, metric
        self.params = {"query_chunk": 1024, "gallery_chunk": 65536, **params}
        self._parts: List[torch.Tensor] = []
        self._x = torch.empty(0, dim)
        self._lock = threading.Lock()

    @property
    def vectors(self) -> torch.Tensor:
        if self._parts:  # batches added since the last search are joined once, under a lock
            with self._lock:
                if self._parts:
                    self._x = torch.cat([self._x, *self._parts])
                    self._parts = []
        return self._x

    @property
    def ntotal(self) -> int:
        return int(self._x.shape[0] + sum(p.shape[0] for p in self._parts))

    def add(self, x: np.ndarray) -> None:
        self._parts.append(torch.from_numpy(x.copy()))

    def set_search_params(self, **params: Any) -> None:
        unknown = set(params) - {"query_chunk", "gallery_chunk"}
        if unknown:
            raise SearchIndexError(f"backend exact: no search parameter {sorted(unknown)} (it is exact; "
                                   "query_chunk and gallery_chunk set its memory use)")
        self.params.update(params)

    @torch.no_grad()
    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        g = self.vectors
        k = min(k, g.shape[0])
        qt = torch.from_numpy(q)
        largest = self.metric == "cosine"
        gsq = (g * g).sum(1) if not largest else None
        out_s, out_i = [], []
        qc, gc = int(self.params["query_chunk"]), int(self.params["gallery_chunk"])
        for qs in range(0, qt.shape[0], qc):
            qb = qt[qs:qs + qc]
            best_s = torch.empty(qb.shape[0], 0)
            best_i = torch.empty(qb.shape[0], 0, dtype=torch.int64)
            for gs in range(0, g.shape[0], gc):
                s = qb @ g[gs:gs + gc].T
                if not largest:  # squared L2 = |q|^2 + |g|^2 - 2 q.g
                    s = ((qb * qb).sum(1, keepdim=True) + gsq[None, gs:gs + gc] - 2 * s).clamp_min_(0)
                s, i = s.topk(min(k, s.shape[1]), dim=1, largest=largest)
                best_s, pos = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1,
                                                             largest=largest)
                best_i = torch.cat([best_i, i + gs], 1).gather(1, pos)
            out_s.append(best_s)
            out_i.append(best_i)
        return torch.cat(out_s).numpy(), torch.cat(out_i).numpy()

    def to_bytes(self) -> bytes:
        return self.vectors.numpy().astype("<f4", copy=False).tobytes()

    def load_bytes(self, data: bytearray, count: int) -> None:
        self._x = torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(count, self.dim))
        self._parts = []


class FaissBackend:
    """A FAISS index built on the first ``add`` (IVF k-means and PQ codebooks train on those vectors)."""

    defaults: Dict[str, Dict[str, Any]] = {
        "faiss-flat": {},
        "faiss-ivf": {"nlist": None, "nprobe": 24},
        "faiss-ivfpq": {"nlist": None, "nprobe": 24, "m": None, "nbits": None, "refine": 0},
        "faiss-hnsw": {"M": 32, "ef_construction": 64, "ef_search": 96},
    }

    def __init__(self, name: str, dim: int, metric: str, params: Dict[str, Any]) -> None:
        import faiss

        unknown = set(params) - set(self.defaults[name])
        if unknown:
            raise SearchIndexError(f"backend {name}: unknown parameter(s) {sorted(unknown)} "
                                   f"(valid: {', '.join(self.defaults[name]) or 'none'})")
        self.faiss, self.name, self.dim, self.metric = faiss, name, dim, metric
        self.params = {**self.defaults[name], **params}
        self._mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        self.index = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _flat(self, x: np.ndarray) -> Any:
        ip = self._mt == self.faiss.METRIC_INNER_PRODUCT
        return self.faiss.IndexFlatIP(self.dim) if ip else self.faiss.IndexFlatL2(self.dim)

    def _hnsw(self, x: np.ndarray) -> Any:
        index = self.faiss.IndexHNSWFlat(self.dim, int(self.params["M"]), self._mt)
        index.hnsw.efConstruction = int(self.params["ef_construction"])
        return index

    def _nlist(self, n: int) -> int:
        if self.params["nlist"] is None:  # ~4 sqrt(N) lists, each with >= 39 training points (faiss's minimum)
            self.params["nlist"] = int(max(1, min(4 * math.sqrt(n), n // 39)))
        return int(self.params["nlist"])

    def _ivf(self, x: np.ndarray) -> Any:
        index = self.faiss.IndexIVFFlat(self._flat(x), self.dim, self._nlist(x.shape[0]), self._mt)
        # k-means on up to 64 points per list (faiss's default 256 makes 1M-vector builds take many minutes)
        index.cp.max_points_per_centroid = 64
        return index

    def _ivfpq(self, x: np.ndarray) -> Any:
        p, d, n = self.params, self.dim, x.shape[0]
        nlist = self._nlist(n)
        if p["m"] is None:  # bytes per code: the largest divisor of D up to D/4 (and 64)
            p["m"] = max(m for m in range(1, min(64, max(1, d // 4)) + 1) if d % m == 0)
        if d % int(p["m"]):
            raise SearchIndexError(f"faiss-ivfpq: m={p['m']} must divide the vector size {d}")
        if p["nbits"] is None:  # 2^nbits centroids per sub-quantiser, >= 39 training points each
            p["nbits"] = int(max(1, min(8, math.floor(math.log2(max(n / 39, 2))))))
        index = self.faiss.IndexIVFPQ(self._flat(x), d, nlist, int(p["m"]), int(p["nbits"]), self._mt)
        index.cp.max_points_per_centroid = 64
        index.pq.cp.max_points_per_centroid = 64  # m small k-means of 2^nbits centroids: 16k points each at most
        if p["refine"]:  # re-rank refine x k PQ candidates with exact distances (keeps raw vectors too)
            index = self.faiss.IndexRefineFlat(index)
        return index

    _builders = {"faiss-flat": _flat, "faiss-hnsw": _hnsw, "faiss-ivf": _ivf, "faiss-ivfpq": _ivfpq}
    #: search-time knobs per backend (the rest are fixed at build time)
    search_knobs = {"faiss-flat": (), "faiss-hnsw": ("ef_search",), "faiss-ivf": ("nprobe",),
                    "faiss-ivfpq": ("nprobe", "refine")}

    def _create(self, x: np.ndarray) -> Any:
        index = self._builders[self.name](self, x)
        if not index.is_trained:
            index.train(x)
        return index

    def add(self, x: np.ndarray) -> None:
        if self.index is None:
            if x.shape[0] == 0:
                return
            self.index = self._create(x)
            self.set_search_params()
        self.index.add(x)

    def set_search_params(self, **params: Any) -> None:
        """``nprobe`` (IVF), ``refine`` (IVF-PQ) or ``ef_search`` (HNSW). Changes the index in place: not
        while searching."""
        unknown = set(params) - set(self.search_knobs[self.name])
        if unknown:
            raise SearchIndexError(f"backend {self.name}: {sorted(unknown)} cannot change at search time "
                                   f"(search parameters: {', '.join(self.search_knobs[self.name]) or 'none'})")
        if params.get("refine") and not self.params["refine"] and self.index is not None:
            raise SearchIndexError("faiss-ivfpq: refine must be set when the index is built (--param refine=8)")
        self.params.update(params)
        if self.index is None:
            return
        if "nprobe" in self.params:
            self.faiss.extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])
        if "ef_search" in self.params:
            self.index.hnsw.efSearch = int(self.params["ef_search"])
        if self.params.get("refine"):
            self.faiss.downcast_index(self.index).k_factor = float(self.params["refine"])

    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        scores, ids = self.index.search(q, min(k, self.ntotal))
        return scores, ids.astype(np.int64)

    def to_bytes(self) -> np.ndarray:
        return self.faiss.serialize_index(self.index)

    def load_bytes(self, data: bytearray, count: int) -> None:
        self.index = self.faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if self.index.ntotal != count or self.index.d != self.dim:
            raise ValueError(f"faiss index holds {self.index.ntotal}x{self.index.d}, header says {count}x{self.dim}")
        self.set_search_params()


def _faiss_backend(name: str):
    def make(dim: int, metric: str, params: Dict[str, Any]) -> FaissBackend:
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is INFO noise
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise SearchIndexError(f"backend {name} needs faiss: pip install faiss-cpu") from None
        return FaissBackend(name, dim, metric, params)
    return make


#: backend name -> constructor ``(dim, metric, params)``
BACKENDS = {"exact": ExactBackend, **{name: _faiss_backend(name) for name in FaissBackend.defaults}}


def _make_backend(name: str, dim: int, metric: str, params: Dict[str, Any]):
    try:
        make = BACKENDS[name]
    except KeyError:
        raise SearchIndexError(f"unknown index backend {name!r} (valid: {', '.join(BACKENDS)})") from None
    return make(dim, metric, params)


# -- centroids ---------------------------------------------------------------------------------------

def label_centroids(vectors: Any, labels: Sequence[int], paths: Optional[Sequence[Optional[str]]] = None,
                    metric: str = "cosine"):
    """One vector per label: ``(centroids (C, D) float32, labels (C,) int64, paths, counts (C,) int64)``.

    The mean of each label's vectors (members L2-normalised first and the mean re-normalised for
    ``cosine``); ``paths`` holds each label's first member (a picture to show for the centroid).
    Labels < 0 (unlabelled) are skipped.
    """
    x = _as_matrix(vectors, None, "centroids")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    keep = labels >= 0
    if not keep.any():
        raise SearchIndexError("centroid mode needs labels: every item is unlabelled (-1); embed a folder "
                               "with one subfolder per class, or a list file with labels")
    if metric == "cosine":
        x = _l2_normalize(x)
    idx = np.flatnonzero(keep)
    uniq, first, inverse, counts = np.unique(labels[idx], return_index=True, return_inverse=True,
                                             return_counts=True)
    sums = np.zeros((len(uniq), x.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, x[idx])
    cent = (sums / counts[:, None]).astype(np.float32)
    if metric == "cosine":
        cent = _l2_normalize(cent)
    rep = None if paths is None else [paths[i] for i in idx[first]]
    return cent, uniq.astype(np.int64), rep, counts.astype(np.int64)


# -- the index -----------------------------------------------------------------------------------------

class SearchIndex:
    """Vectors plus per-item metadata (label, path), searchable by ``search(queries, k)``.

    >>> idx = SearchIndex(dim=2, metric="cosine")
    >>> idx.add([[1.0, 0.0], [0.0, 1.0]], labels=[7, 8], paths=["a.jpg", "b.jpg"])
    >>> [(h.id, round(h.score, 3), h.label) for h in idx.search([[1.0, 0.1]], k=2)[0]]
    [(0, 0.995, 7), (1, 0.1, 8)]
    """

    def __init__(self, dim: int, metric: str = "cosine", backend: str = "exact", *, mode: str = "items",
                 class_names: Optional[Sequence[str]] = None, source: Optional[Dict[str, Any]] = None,
                 **params: Any) -> None:
        if metric not in METRICS:
            raise SearchIndexError(f"unknown metric {metric!r} (valid: {', '.join(METRICS)})")
        self.dim, self.metric, self.backend_name, self.mode = int(dim), metric, backend, mode
        self.backend = _make_backend(backend, self.dim, metric, dict(params))
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.source: Dict[str, Any] = dict(source or {})
        self._labels: List[np.ndarray] = []
        self._paths: List[Optional[str]] = []
        self.counts: Optional[np.ndarray] = None  # members per centroid, in centroid mode

    @classmethod
    def build(cls, embeddings, backend: str = "exact", metric: str = "cosine", centroids: bool = False,
              class_names: Optional[Sequence[str]] = None, source: Optional[Dict[str, Any]] = None,
              **params: Any) -> "SearchIndex":
        """An index over an :class:`~deepmetric.inference.EmbeddingSet` (one vector per item, or per label)."""
        vectors, labels, paths = embeddings.vectors, embeddings.labels, embeddings.paths
        index = cls(embeddings.dim, metric, backend, mode="centroids" if centroids else "items",
                    class_names=class_names, source=source, **params)
        if centroids:
            vectors, labels, paths, counts = label_centroids(vectors, labels, paths, metric)
            index.source["unlabelled_skipped"] = int((np.asarray(embeddings.labels) < 0).sum())
        index.add(vectors, labels, paths)
        if centroids:
            index.counts = counts
        return index

    def __len__(self) -> int:
        return self.backend.ntotal

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` int64, -1 for unlabelled items."""
        labels = self._labels
        if len(labels) > 1:
            labels = [np.concatenate(labels)]
            self._labels = labels
        return labels[0] if labels else np.zeros(0, np.int64)

    @property
    def paths(self) -> List[Optional[str]]:
        return self._paths

    def add(self, vectors: Any, labels: Optional[Sequence[int]] = None,
            paths: Optional[Sequence[Optional[str]]] = None) -> None:
        """Append ``(N, D)`` vectors with their labels (default -1) and paths (default None)."""
        x = _as_matrix(vectors, self.dim, "SearchIndex.add")
        n = x.shape[0]
        lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        pth = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        if len(lab) != n or len(pth) != n:
            raise SearchIndexError(f"SearchIndex.add: {n} vectors but {len(lab)} labels and {len(pth)} paths")
        self.backend.add(_l2_normalize(x) if self.metric == "cosine" else x)
        self._labels.append(lab)
        self._paths.extend(pth)

    def set_search_params(self, **params: Any) -> None:
        """Speed/recall knobs: ``nprobe`` (faiss-ivf, faiss-ivfpq), ``ef_search`` (faiss-hnsw)."""
        self.backend.set_search_params(**params)

    def search_arrays(self, queries: Any, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k'), ids (Q, k'))`` best first, ``k' = min(k, len(self))``; ids -1 mark missing hits."""
        if k < 1:
            raise SearchIndexError(f"search: k must be >= 1, got {k}")
        q = _as_matrix(queries, self.dim, "SearchIndex.search queries")
        return self.backend.search(_l2_normalize(q) if self.metric == "cosine" else q, int(k))

    def search(self, queries: Any, k: int = 10) -> List[List[Hit]]:
        """The ``k`` nearest items of each query ``(Q, D)`` (or one ``(D,)`` vector), best first."""
        scores, ids = self.search_arrays(queries, k)
        labels, names = self.labels, self.class_names
        out = []
        for srow, irow in zip(scores, ids):
            hits = []
            for s, i in zip(srow.tolist(), irow.tolist()):
                if i < 0:
                    continue
                lab = int(labels[i])
                name = names[lab] if names is not None and 0 <= lab < len(names) else None
                hits.append(Hit(int(i), float(s), lab, self._paths[i], name))
            out.append(hits)
        return out

    def info(self) -> Dict[str, Any]:
        """What the index is: backend, metric, dim, count, mode, parameters and source."""
        return {"backend": self.backend_name, "metric": self.metric, "dim": self.dim, "count": len(self),
                "mode": self.mode, "params": dict(self.backend.params), "source": self.source}

    # -- files ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one file atomically (temporary sibling, fsync, rename)."""
        path = Path(path)
        if len(self) == 0:
            raise SearchIndexError(f"{path}: refusing to save an empty index")
        sections = [("labels", self.labels.astype("<i8").tobytes()),
                    ("paths", json.dumps(self._paths).encode())]
        if self.counts is not None:
            sections.append(("counts", np.asarray(self.counts, "<i8").tobytes()))
        sections.append(("vectors" if self.backend_name == "exact" else "faiss", self.backend.to_bytes()))
        table, offset = [], 0
        for name, data in sections:
            nbytes = memoryview(data).nbytes
            table.append({"name": name, "offset": offset, "nbytes": nbytes, "crc32": zlib.crc32(data)})
            offset += nbytes
        from .. import __version__

        header = json.dumps({**self.info(), "class_names": self.class_names, "written_by": f"deepmetric {__version__}",
                             "sections": table}).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
                f.write(header)
                for _, data in sections:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchIndex":
        """Read a file written by :meth:`save`; :class:`IndexFileError` names the file if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise IndexFileError(f"index file not found: {path}" if not path.exists()
                                 else f"{path}: is not a file (expected an index written by 'deepmetric index build')")
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
                raise IndexFileError(f"{path}: not a deepmetric index file (no {MAGIC[:7].decode()} header); "
                                     "build one with 'deepmetric index build'")
            _, version, hlen = _PREFIX.unpack(prefix)
            if version > FORMAT_VERSION:
                raise IndexFileError(f"{path}: index format version {version} is newer than this deepmetric "
                                     f"reads ({FORMAT_VERSION}); upgrade deepmetric")
            try:
                header = json.loads(f.read(hlen).decode())
                table = header["sections"]
                expected = _PREFIX.size + hlen + sum(int(s["nbytes"]) for s in table)
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise IndexFileError(f"{path}: corrupt index header ({type(e).__name__}); the file is damaged "
                                     "or truncated, rebuild it") from None
            if size < expected:
                raise IndexFileError(f"{path}: truncated index file ({size} bytes, expected {expected}); "
                                     "rebuild it with 'deepmetric index build'")
            data = {}
            for s in table:
                buf = bytearray(int(s["nbytes"]))
                f.readinto(buf)
                if zlib.crc32(buf) != s["crc32"]:
                    raise IndexFileError(f"{path}: section '{s['name']}' fails its checksum (corrupt file); rebuild it")
                data[s["name"]] = buf
        try:
            index = cls(header["dim"], header["metric"], header["backend"], mode=header.get("mode", "items"),
                        class_names=header.get("class_names"), source=header.get("source"), **header["params"])
            count = int(header["count"])
            index.backend.load_bytes(data["vectors" if header["backend"] == "exact" else "faiss"], count)
            index._labels = [np.frombuffer(data["labels"], dtype="<i8").astype(np.int64)]
            index._paths = json.loads(data["paths"].decode())
            if "counts" in data:
                index.counts = np.frombuffer(data["counts"], dtype="<i8").astype(np.int64)
            if len(index.labels) != count or len(index._paths) != count:
                raise ValueError("metadata and vector counts differ")
        except IndexFileError:
            raise
        except Exception as e:  # noqa: BLE001 - anything inside a damaged file
            raise IndexFileError(f"{path}: unreadable index ({type(e).__name__}: {e})".splitlines()[0]) from None
        return index
