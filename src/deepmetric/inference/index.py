"""Search over embeddings: :class:`SearchIndex`, a live gallery with an exact (numpy) and four FAISS backends;
:func:`deepmetric.inference.stores.open_index` opens an index file or a vector database's collection.

| backend | structure | memory per vector | recall | ``add`` | ``remove`` |
|---|---|---|---|---|---|
| ``exact`` | all vectors (numpy); chunks of queries ranked by ``stable_topk`` | ``4 D`` bytes | exact | append | drop rows |
| ``faiss-flat`` | ``IndexFlatIP`` / ``IndexFlatL2`` | ``4 D`` bytes | exact | append | drop rows |
| ``faiss-ivf`` | ``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` probed | ``4 D`` bytes | tunable | into the nearest list | drop rows from their lists |
| ``faiss-ivfpq`` | ``IndexIVFPQ``, ``m`` codes of ``nbits``; ``refine=R`` re-ranks ``R k`` exactly | ``m`` (``+4 D``) bytes | lossy | encoded into its list | drop rows from their lists |
| ``faiss-hnsw`` | ``IndexHNSWFlat``, ``M`` links, ``efSearch`` | ``4 D + 8 M`` bytes | tunable | graph insert | tombstone; searches skip it |

IVF centroids and PQ codebooks are trained on the first ``add`` and kept: later items go into the
existing lists, so a catalogue that drifts far from its first batch is better rebuilt (``index build``).
FAISS has no removal for HNSW graphs, so ``faiss-hnsw`` marks removed items dead and its searches skip
them; :meth:`SearchIndex.compact` rebuilds the graph over the live items (seconds per 100k items),
which ``edit_index`` does once a quarter of the graph is dead and a server does in the background
(:mod:`deepmetric.inference.hnsw`).

Item ids are stable: ``add`` numbers new items from ``next_id`` on, ``remove`` never renumbers and no id
is ever reused, and hits report that id. Every vector must be finite: a NaN or infinite one is refused
with its row. ``changes`` counts the adds and removes an index has seen since it was built
(``lineage`` names that build); with them a file's change log (:mod:`deepmetric.inference.index_log`)
is matched to it, and :meth:`SearchIndex.load` replays the log's changes the file does not hold yet. Backends work in rows (0..N-1, in id order); the index maps rows
to ids, so the exact backends give exactly what a fresh build over the remaining items gives.

Metrics: ``cosine`` (vectors and queries are L2-normalised, score = inner product, higher is closer)
and ``squared_euclidean`` (score = squared Euclidean distance, lower is closer; ``l2`` is accepted as
its old name). Exact search breaks ties by lower row (= lower id), the rule of
:mod:`deepmetric.evaluation.neighbors`.

Centroid mode (Centroids-ReID, Wieczorek et al. 2021, whose inference averages each identity's embeddings): one vector per label, the mean of
that label's vectors; for cosine the members are normalised before averaging and the mean is
re-normalised. Unlabelled items (label < 0) have no centroid and are skipped (counted in ``source``).
``add`` folds new members into their label's centroid (the member sums are kept): an updated
centroid is a new item with a new id, the old id retires; new labels get new centroids. ``remove``
takes labels or centroid ids; members cannot be removed one by one (they are not stored).

The file (format 2, safetensors) and its checks are in :mod:`deepmetric.inference.index_file`;
:func:`edit_index` adds a lock for read-modify-write (:mod:`deepmetric.inference.index_lock`), which
refuses an index a server is changing. The backends are in
:mod:`deepmetric.inference.backends`; none needs PyTorch.

Search may take a ``filter`` (:class:`~deepmetric.inference.filters.ItemFilter`, one for all queries or
one per query) on the items' ids, labels, label names and paths: the backend searches ``k`` plus the
number of items the filter removes, and the removed ones are dropped, so exact backends give exact
search over the items that pass.

``milvus`` is no backend of this table but an index that lives in a Milvus collection
(:class:`~deepmetric.inference.milvus_backend.MilvusIndex`, opened by URI: :mod:`.stores`): the same
search, add and remove, with camera ids stored too and filters run by Milvus, and every change durable
once made (``durable``), so it has no file, no change log and no lock.

Not thread-safe while changing: ``add``, ``remove`` and ``set_search_params`` must not run during a search.
"""
from __future__ import annotations

import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import index_file, index_lock, index_log
from .backends import ExactBackend, FaissMissingError, SearchIndexError
from .faiss_backends import FlatBackend, IVFBackend, IVFPQBackend
from .hnsw import HNSWBackend
from .filters import filtered_search
from .index_file import MODES, IndexFileError, StringTable, few
from .vectors import (METRIC_ALIASES, METRICS, as_matrix, canonical_metric, centroid_vectors, check_finite,
                      l2_normalize, label_centroids, labelled, member_sums)

__all__ = ["SearchIndex", "Hit", "StringTable", "edit_index", "label_centroids", "canonical_metric", "BACKENDS",
           "METRICS", "METRIC_ALIASES", "MODES", "SearchIndexError", "UnknownItemError", "IndexFileError",
           "FaissMissingError"]

log = logging.getLogger("deepmetric")

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
class Batch:
    """Items to add, checked by :meth:`SearchIndex.check_batch`: ``vectors (N, D)`` float32 as given
    (finite), ``labels (N,)`` int64 (>= -1; indexes into ``class_names`` when given), ``paths``."""

    vectors: np.ndarray
    labels: np.ndarray
    paths: List[Optional[str]]
    class_names: Optional[List[str]] = None


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

    #: changes are kept only by :meth:`save` (a database collection keeps each as it is made)
    durable = False

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
        self.lineage = secrets.token_hex(8)  # this build; kept by every save and load
        self.changes = 0  # adds and removes since the build
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

    def close(self) -> None:
        """Nothing to let go: the index is in memory (a database index closes its connection)."""

    def items(self, ids: Sequence[int]) -> List[Tuple[int, int, Optional[str], Optional[str]]]:
        """``(id, label, label name, path)`` of each stable id; :class:`UnknownItemError` for one there is not."""
        rows = self._rows_of_ids(ids).tolist()
        return [(int(self._ids[r]), int(self._labels[r]), self.label_name(int(self._labels[r])), self._paths[r])
                for r in rows]

    def paths_under(self, prefix: str) -> List[str]:
        """The stored paths that start with ``prefix``."""
        return [p for p in self._paths if p and p.startswith(prefix)]

    @property
    def unnamed_labels(self) -> bool:
        """Whether the labels are numbers without class names (an index of a list file)."""
        return self.class_names is None and bool((self._labels >= 0).any())

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) if self.metric == "cosine" else x

    def add(self, vectors: Any, labels: Optional[Sequence[int]] = None,
            paths: Optional[Sequence[Optional[str]]] = None,
            class_names: Optional[Sequence[str]] = None) -> np.ndarray:
        """Add ``(N, D)`` vectors with their labels (default -1) and paths (default None); returns the new ids.

        With ``class_names`` the labels index those names and are mapped to the index's own (names it
        lacks are appended); without, they are taken as the index's labels. In centroid mode the vectors
        are members: their labels' centroids are recomputed (see the module docstring).
        """
        return self.add_batch(self.check_batch(vectors, labels, paths, class_names))

    def check_batch(self, vectors: Any, labels: Optional[Sequence[int]] = None,
                    paths: Optional[Sequence[Optional[str]]] = None,
                    class_names: Optional[Sequence[str]] = None) -> Batch:
        """The arguments of :meth:`add`, checked without changing the index: everything that would make
        ``add`` fail raises here (:class:`SearchIndexError`), so :meth:`add_batch` of the result cannot."""
        x = as_matrix(vectors, self.dim, "SearchIndex.add")
        n = x.shape[0]
        lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        pth = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        if len(lab) != n or len(pth) != n:
            raise SearchIndexError(f"SearchIndex.add: {n} vectors but {len(lab)} labels and {len(pth)} paths")
        check_finite(x, "SearchIndex.add", pth)
        if len(lab) and int(lab.min()) < -1:
            raise SearchIndexError(f"SearchIndex.add: label {int(lab.min())}; labels are >= 0, or -1 for unlabelled")
        names = None if class_names is None else [str(c) for c in class_names]
        if names is not None:
            self._map_labels(lab, names)
        if self.mode == "centroids" and n:
            labelled(lab)
        return Batch(x, lab, pth, names)

    def add_batch(self, batch: Batch) -> np.ndarray:
        """Add a batch :meth:`check_batch` made; returns the new ids."""
        lab, names = batch.labels, self.class_names
        if batch.class_names is not None:
            lab, names = self._map_labels(lab, batch.class_names)
        if self.mode == "centroids":
            ids = self._add_members(self._prepare(batch.vectors), lab, batch.paths)
        else:
            ids = self._append(self._prepare(batch.vectors), lab, StringTable.from_list(batch.paths))
        self.class_names = names
        self.changes += 1
        return ids

    def add_stream(self, batches: Iterable[Tuple[Any, np.ndarray, StringTable]]) -> int:
        """Add batches ``(vectors (n, D), labels (n,) int64, paths)`` one after another as one change, the way
        a streaming build does: each batch's vectors go to the backend as they come, and the per-item
        metadata (ids, labels, paths) is joined once at the end, so memory holds one batch of vectors and
        never copies what came before it per batch. Labels are the index's own (no class-name mapping);
        items mode only. A batch that is refused (wrong shape, NaN, label below -1) raises, and the batches
        before it stay added. Returns the number of items added."""
        if self.mode != "items":
            raise SearchIndexError("add_stream: a centroid index takes its members through add()")
        labels, paths, n = [self._labels], [self._paths], 0
        try:
            for vectors, lab, pth in batches:
                x = as_matrix(vectors, self.dim, "SearchIndex.add_stream")
                lab = np.asarray(lab, np.int64).reshape(-1)
                if len(lab) != len(x) or len(pth) != len(x):
                    raise SearchIndexError(f"SearchIndex.add_stream: {len(x)} vectors but {len(lab)} labels and "
                                           f"{len(pth)} paths")
                check_finite(x, "SearchIndex.add_stream", pth)
                if len(lab) and int(lab.min()) < -1:
                    raise SearchIndexError(f"SearchIndex.add_stream: label {int(lab.min())}; labels are >= 0, or -1")
                self.backend.add(self._prepare(x))
                labels.append(lab)
                paths.append(pth)
                n += len(x)
        finally:
            self._ids = np.concatenate([self._ids, np.arange(self.next_id, self.next_id + n, dtype=np.int64)])
            self._labels, self._paths = np.concatenate(labels), StringTable.join(paths)
            self.next_id += n
            self.changes += 1 if n else 0
        return n

    def _map_labels(self, lab: np.ndarray, names: List[str]) -> Tuple[np.ndarray, List[str]]:
        if len(lab) and int(lab.max()) >= len(names):
            raise SearchIndexError(f"label {int(lab.max())} has no class name (there are {len(names)})")
        if self.unnamed_labels:
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
        idx = labelled(lab)
        if len(idx) < len(lab):
            self.source["unlabelled_skipped"] = int(self.source.get("unlabelled_skipped", 0)) + len(lab) - len(idx)
            log.warning("centroid index: %d unlabelled vectors have no centroid and were skipped", len(lab) - len(idx))
        uniq, first, sums, counts = member_sums(x[idx], lab[idx])
        row = {int(label): r for r, label in enumerate(self._labels.tolist())}
        old = np.array([row.get(int(label), -1) for label in uniq], np.int64)
        hit = old >= 0
        sums[hit] += self._sums[old[hit]]
        counts[hit] += self.counts[old[hit]]
        paths = [self._paths[r] if r >= 0 else pth[i] for r, i in zip(old.tolist(), idx[first].tolist())]
        if hit.any():  # updated centroids are new items: the old ids retire
            self._drop_rows(old[hit])
        return self._append(centroid_vectors(sums, counts, self.metric), uniq, StringTable.from_list(paths),
                            counts, sums)

    def remove(self, ids: Optional[Sequence[int]] = None, paths: Optional[Sequence[str]] = None,
               labels: Optional[Sequence[Any]] = None) -> np.ndarray:
        """Remove items by stable id, by path (as stored, or its absolute form) or by label (a number or a
        class name); any combination removes their union. Returns the removed ids, ascending.

        Raises :class:`UnknownItemError` naming what matches no item, and refuses to empty the index.
        """
        removed = self.select(ids, paths, labels)
        if len(removed):
            self._drop_rows(self._rows_of_ids(removed))
            self.changes += 1
        return removed

    def select(self, ids: Optional[Sequence[int]] = None, paths: Optional[Sequence[str]] = None,
               labels: Optional[Sequence[Any]] = None) -> np.ndarray:
        """The ids :meth:`remove` would remove, ascending, with its errors; the index is not changed."""
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
        return self._ids[drop]

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

    def compaction(self, force: bool = False) -> Any:
        """The backend's compaction (``faiss-hnsw`` with removed rows:
        :class:`~deepmetric.inference.hnsw.HNSWCompaction`) once worth it (``force``: whenever there is a
        removed row), else None."""
        return self.backend.compaction(force)

    def compact(self) -> None:
        """Drop the removed rows a backend still keeps (``faiss-hnsw``'s tombstones) now: a rebuild."""
        job = self.compaction(force=True)
        if job is not None:
            job.build()
            job.install()

    def set_search_params(self, **params: Any) -> None:
        """Speed/recall knobs: ``nprobe`` (faiss-ivf, faiss-ivfpq), ``ef_search`` (faiss-hnsw)."""
        self.backend.set_search_params(**params)

    def _search_rows(self, queries: Any, k: int, filter: Any = None) -> Tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise SearchIndexError(f"search: k must be >= 1, got {k}")
        q = as_matrix(queries, self.dim, "SearchIndex.search queries")
        check_finite(q, "SearchIndex.search: query")
        if len(q) == 0:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
        if filter is None:
            return self.backend.search(self._prepare(q), int(k))
        return filtered_search(self.backend.search, self._prepare(q), int(k), filter, self._columns, len(self))

    def _columns(self, fields: List[str]) -> Dict[str, Any]:
        """The filterable fields per row (:mod:`deepmetric.inference.filters`)."""
        if "camera" in fields:
            raise SearchIndexError("an index file keeps no camera ids, so it cannot filter on them; build a Milvus "
                                   "index (deepmetric index build --backend milvus --uri gallery.db) from embeddings "
                                   "with camera ids")
        every = {"id": lambda: self._ids, "label": lambda: self._labels, "path": lambda: list(self._paths),
                 "label_name": lambda: [self.label_name(int(v)) for v in self._labels]}
        return {f: every[f]() for f in fields}

    def search_arrays(self, queries: Any, k: int = 10, filter: Any = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k'), ids (Q, k'))`` best first, ``k' = min(k, len(self))``; ids -1 mark missing hits
        (``filter``: as :meth:`search`)."""
        scores, rows = self._search_rows(queries, k, filter)
        return scores, np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)

    def label_name(self, label: int) -> Optional[str]:
        """The class name of ``label``, or None (no names, or a label outside them)."""
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else None

    def search(self, queries: Any, k: int = 10, filter: Any = None) -> List[List[Hit]]:
        """The ``k`` nearest items of each query ``(Q, D)`` (or one ``(D,)`` vector), best first; with
        ``filter`` (an :class:`~deepmetric.inference.filters.ItemFilter`, or one per query) only among
        the items it passes."""
        scores, rows = self._search_rows(queries, k, filter)
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

    def header(self) -> Dict[str, Any]:
        """The file's JSON header (:mod:`deepmetric.inference.index_file`), array checksums aside."""
        from ..core import __version__

        return {**self.info(), "class_count": None if self.class_names is None else len(self.class_names),
                "lineage": self.lineage, "changes": self.changes, "slots": int(self.backend.slots),
                "written_by": f"deepmetric {__version__}"}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one file atomically (format: :mod:`deepmetric.inference.index_file`)."""
        return self.snapshot(copy=False).save(path)

    def snapshot(self, copy: bool = True) -> "IndexSnapshot":
        """What :meth:`save` writes, taken now: with ``copy`` its arrays are copies, so the snapshot can be
        written while the index changes (a server copies under its lock and writes outside it)."""
        arrays = self.arrays()
        if copy:
            arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
        return IndexSnapshot(arrays, self.header(), self.changes, len(self))

    @classmethod
    def load(cls, path: str | os.PathLike, log: bool = True) -> "SearchIndex":
        """Read a file written by :meth:`save`; :class:`IndexFileError` names the file if it is not one.

        With ``log``, the changes its change log (``PATH.wal``, written by a server) holds beyond the
        file are replayed (:func:`deepmetric.inference.index_log.replay`), so a reader sees every
        change a server acknowledged, even before the server saved the file.
        """
        def open_index(h: Dict[str, Any], read_arrays) -> "SearchIndex":
            index = cls(h["dim"], h["metric"], h["backend"], mode=h["mode"], source=h["source"], **h["params"])
            index.backend.folder = Path(path).parent  # where a backend finds files of its own (on-disk lists)
            index._restore(h, read_arrays(index_file.expected_arrays(h, index.backend)))
            return index

        index = index_file.read(Path(path), open_index, BACKENDS)
        if log:
            index_log.replay(index, Path(path))
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
        if self.backend.ntotal != len(ids):
            raise ValueError(f"the backend holds {self.backend.ntotal} live rows for {len(ids)} items")
        self._ids, self._labels, self._paths, self.next_id = ids, labels, paths, h["next_id"]
        self.lineage, self.changes = h["lineage"], h["changes"]


@dataclass(frozen=True)
class IndexSnapshot:
    """An index's file contents at one moment (:meth:`SearchIndex.snapshot`): ``changes`` and ``count``
    are the index's then."""

    arrays: Dict[str, np.ndarray]
    header: Dict[str, Any]
    changes: int
    count: int

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if self.count == 0:
            raise SearchIndexError(f"{path}: refusing to save an empty index")
        return index_file.write(path, self.arrays, self.header)


@contextmanager
def edit_index(path: str | os.PathLike) -> Iterator[SearchIndex]:
    """Load the index at ``path`` (its change log replayed), yield it for changes and save it atomically
    when the block ends without an error; then the log, now in the file, is removed. An exclusive lock
    (:func:`deepmetric.inference.index_lock.editing`) serialises concurrent edits, so two
    ``deepmetric index add`` runs cannot lose each other's items, and refuses an index that a running
    ``deepmetric serve`` is changing (its next save would undo the edit)."""
    path = Path(path)
    if not path.is_file():
        SearchIndex.load(path)  # raises the error that says what is there instead
    with index_lock.editing(path):
        index = SearchIndex.load(path)
        yield index
        if index.compaction() is not None:
            index.compact()
        index.save(path)
        index_log.discard(path)
