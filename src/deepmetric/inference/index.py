"""Search over embeddings: :class:`SearchIndex`, a live gallery with an exact (numpy) and four FAISS backends.

| backend | structure | memory per vector | recall | ``add`` | ``remove`` |
|---|---|---|---|---|---|
| ``exact`` | all vectors (numpy); chunks of queries ranked by ``stable_topk`` | ``4 D`` bytes | exact | append | drop rows |
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

The file (format 2, safetensors) and its checks are in :mod:`deepmetric.inference.index_file`;
:func:`edit_index` adds a lock for read-modify-write. The backends are in
:mod:`deepmetric.inference.backends`; none needs PyTorch.

Not thread-safe while changing: ``add``, ``remove`` and ``set_search_params`` must not run during a search.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.distances import DISTANCES
from . import index_file
from .backends import ExactBackend, FaissMissingError, SearchIndexError
from .faiss_backends import FlatBackend, HNSWBackend, IVFBackend, IVFPQBackend
from .index_file import MODES, IndexFileError, StringTable, few

__all__ = ["SearchIndex", "Hit", "StringTable", "edit_index", "label_centroids", "canonical_metric", "BACKENDS",
           "METRICS", "METRIC_ALIASES", "MODES", "SearchIndexError", "UnknownItemError", "IndexFileError",
           "FaissMissingError"]

log = logging.getLogger("deepmetric")

#: the :data:`~deepmetric.core.distances.DISTANCES` an index scores by; not plain ``euclidean``, which ranks
#: as squared does (and FAISS reports squared)
METRICS = tuple(d for d in DISTANCES if d != "euclidean")
METRIC_ALIASES = {"l2": "squared_euclidean"}


#: backend name -> class ``(dim, metric, params)`` (:mod:`.backends`, :mod:`.faiss_backends`)
BACKENDS = {b.name: b for b in (ExactBackend, FlatBackend, IVFBackend, IVFPQBackend, HNSWBackend)}


def make_backend(name: str, dim: int, metric: str, params: Dict[str, Any]):
    try:
        make = BACKENDS[name]
    except KeyError:
        raise SearchIndexError(f"unknown index backend {name!r} (valid: {', '.join(BACKENDS)})") from None
    return make(dim, metric, params)


class UnknownItemError(SearchIndexError):
    """An id, path or label that names no item of the index."""


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
    torch = sys.modules.get("torch")  # a tensor exists only where torch is imported; never imported here
    if torch is not None and torch.is_tensor(x):
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise SearchIndexError(f"{what}: expected shape (N, {dim or 'D'}), got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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
        self.backend = make_backend(backend, self.dim, self.metric, dict(params))
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
            raise SearchIndexError(f"item ids must be integers, got {few(want.tolist())}")
        pos = np.minimum(np.searchsorted(self._ids, want), max(len(self) - 1, 0))
        found = (self._ids[pos] == want) if len(self) else np.zeros(len(want), bool)
        if not found.all():
            span = f"ids {self._ids[0]}..{self._ids[-1]}, " if len(self) else ""
            raise UnknownItemError(f"no item with id {few(want[~found].tolist())} in the index ({span}{len(self)} "
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
            raise UnknownItemError(f"no item with path {few(missing, 3)} in the index")
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
            raise UnknownItemError(f"no item has label {few(unknown, 5)}"
                                   + (f" (class names: {few(self.class_names, 5)})" if self.class_names else ""))
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

    def label_name(self, label: int) -> Optional[str]:
        """The class name of ``label``, or None (no names, or a label outside them)."""
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else None

    def search(self, queries: Any, k: int = 10) -> List[List[Hit]]:
        """The ``k`` nearest items of each query ``(Q, D)`` (or one ``(D,)`` vector), best first."""
        scores, rows = self._search_rows(queries, k)
        out = []
        for srow, rrow in zip(scores.tolist(), rows.tolist()):
            hits = []
            for s, r in zip(srow, rrow):
                if r < 0:
                    continue
                lab = int(self._labels[r])
                hits.append(Hit(int(self._ids[r]), float(s), lab, self._paths[r], self.label_name(lab)))
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
        """Write the index to one file atomically (format: :mod:`deepmetric.inference.index_file`)."""
        from ..core import __version__

        path = Path(path)
        if len(self) == 0:
            raise SearchIndexError(f"{path}: refusing to save an empty index")
        header = {**self.info(), "class_count": None if self.class_names is None else len(self.class_names),
                  "written_by": f"deepmetric {__version__}"}
        return index_file.write(path, self.arrays(), header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchIndex":
        """Read a file written by :meth:`save`; :class:`IndexFileError` names the file if it is not one."""
        def open_index(h: Dict[str, Any], read_arrays) -> "SearchIndex":
            index = cls(h["dim"], h["metric"], h["backend"], mode=h["mode"], source=h["source"], **h["params"])
            index._restore(h, read_arrays(index_file.expected_arrays(h, index.backend)))
            return index

        return index_file.read(Path(path), open_index, BACKENDS)

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
