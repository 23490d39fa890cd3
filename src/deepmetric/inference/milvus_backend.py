"""A search index kept in a Milvus collection: :class:`MilvusIndex`, with :class:`~.index.SearchIndex`'s
search, add and remove, for galleries that outgrow one machine's memory.

Milvus Lite (a ``.db`` file, ``pip install 'deepmetric[milvus]'``) is the embedded default; a Milvus
server or cluster runs the same code by URI (:mod:`deepmetric.inference.milvus_store`)::

    deepmetric index build --embeddings features.npz --backend milvus --uri gallery.db
    deepmetric serve --model model.onnx --index milvus://gallery.db
    deepmetric search --index milvus://host:19530/gallery --checkpoint runs/x --query q.jpg

One item is one row of the collection: ``id`` (INT64, assigned by Milvus: stable, never reused),
``vector`` (FLOAT_VECTOR, L2-normalised: inner product = cosine similarity), and the scalar fields
``label`` (INT64, -1 unlabelled), ``label_name``, ``path`` (VARCHAR, "" when unknown) and ``camera``
(INT64, -1 unknown), on which searches filter (:class:`~deepmetric.inference.filters.ItemFilter`, run
by Milvus as a boolean expression; a string is passed to Milvus as it is). The collection
``<name>__meta`` beside it holds the index's metadata (dim, metric, model fingerprint, source,
parameters) and its class names, one row per name, so labels keep their numbers across adds as in an
index file. Milvus Lite 2.5 keeps no collection properties, hence a collection.

Every change is Milvus's to keep once ``add`` or ``remove`` returns (``durable``): a server serving
this index writes no change log of its own. Milvus Lite 3 appends each insert and delete to its own
write-ahead log before it answers (flushed to the OS, not fsynced: a killed process loses nothing, a
power cut may lose the last writes; ``benchmarks/bench_milvus.py`` kills a writer to count); a Milvus
cluster keeps them in its message queue.

Vector index: ``index_type`` (default ``AUTOINDEX``; ``FLAT`` is exact), ``M`` and ``ef_construction``
(HNSW), ``nlist`` (IVF); search parameters ``ef_search`` (HNSW) and ``nprobe`` (IVF). Metric: cosine
only (Milvus Lite 3 returns L2 as a distance, Milvus servers its square). New class names take labels
from a counter in the metadata: on a cluster, add new classes from one writer at a time.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .backends import SearchIndexError
from .faiss_compat import search_with_params
from .filters import ItemFilter, groups, per_query
from .index import Batch, Hit, UnknownItemError
from .index_file import few
from .milvus_store import (DEFAULT_COLLECTION, FORMAT, MAX_K, MAX_NAME, MAX_PATH, READ_TIMEOUT_S, SEARCH_PARAMS,
                           WRITE_TIMEOUT_S, Location, MilvusUnavailableError, check_params, connect, create_items,
                           create_meta, import_pymilvus, in_list, meta_name, milvus_errors, read_meta)
from .vectors import as_matrix, canonical_metric, check_finite, l2_normalize

_OUT = ["label", "label_name", "path"]  # the fields of a hit


@dataclass(frozen=True)
class MilvusBatch(Batch):
    """A :class:`~.index.Batch` with ``camids (N,)`` int64 (-1: unknown)."""

    camids: Optional[np.ndarray] = None


class MilvusIndex:
    """A gallery in the Milvus collection at ``location``; make one with :meth:`create` or :meth:`build`,
    open one with :meth:`open`. ``close`` when done (a Milvus Lite file is then free for another process)."""

    backend_name = "milvus"
    mode = "items"
    durable = True  # each add and remove is kept by Milvus once it returns

    def __init__(self, client: Any, location: Location, meta: Dict[str, Any]) -> None:
        self.client, self.location, self.meta = client, location, meta
        self.dim, self.metric = int(meta["dim"]), meta["metric"]
        self.source: Dict[str, Any] = dict(meta.get("source") or {})
        self.lineage = meta["lineage"]
        self.changes = 0  # adds and removes by this process
        self.closed = False
        self.search_params = {k: meta["params"][k] for k in SEARCH_PARAMS if meta["params"].get(k) is not None}

    # -- making and opening ---------------------------------------------------------------------------

    @classmethod
    def create(cls, location: Location, dim: int, metric: str = "cosine", *, named: bool = True,
               source: Optional[Dict[str, Any]] = None, replace: bool = False,
               timeout: Optional[float] = None, **params: Any) -> "MilvusIndex":
        """An empty index at ``location`` (``replace``: an index already there is dropped first)."""
        if canonical_metric(metric) != "cosine":
            raise SearchIndexError(f"backend milvus: metric {metric!r}: only cosine (Milvus Lite and Milvus servers "
                                   "disagree on the scale of L2)")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= 32768:
            raise SearchIndexError(f"backend milvus: dim must be an integer from 1 to 32768, got {dim!r}")
        params = check_params(params)
        client = connect(location, create=True, timeout=timeout)
        try:
            with milvus_errors(location, "creating the collection"):
                return cls._create(client, location, int(dim), named, source, replace, params)
        except BaseException:
            client.close()
            raise

    @classmethod
    def _create(cls, client: Any, location: Location, dim: int, named: bool, source: Optional[Dict[str, Any]],
                replace: bool, params: Dict[str, Any]) -> "MilvusIndex":
        name, side = location.collection, meta_name(location.collection)
        if client.has_collection(name) or client.has_collection(side):
            if not replace:
                raise SearchIndexError(f"{location}: the collection exists already; add to it with deepmetric "
                                       f"index add --index {location.spec}, or pass --replace to rebuild it")
            for n in (name, side):
                if client.has_collection(n):
                    client.drop_collection(n)
        pymilvus = import_pymilvus()
        meta = {"format": FORMAT, "dim": int(dim), "metric": "cosine", "mode": "items", "named": bool(named),
                "next_label": 0, "source": dict(source or {}), "lineage": secrets.token_hex(8),
                "params": params, "written_by": _version()}
        create_items(client, pymilvus, name, dim, params)
        create_meta(client, pymilvus, side)
        index = cls(client, location, meta)
        index._write_meta()
        return index

    @classmethod
    def build(cls, embeddings: Any, uri: str | Location, collection: Optional[str] = None, *,
              class_names: Optional[Sequence[str]] = None, camids: Optional[Sequence[int]] = None,
              metric: str = "cosine", source: Optional[Dict[str, Any]] = None, replace: bool = False,
              timeout: Optional[float] = None, **params: Any) -> "MilvusIndex":
        """An index over an :class:`~deepmetric.core.embeddings.EmbeddingSet` at ``uri`` (``gallery.db``,
        ``http://host:19530``, or a :class:`Location`) and ``collection``, with the camera ids (``camids``,
        else the set's) too."""
        location = uri if isinstance(uri, Location) else Location.of_uri(uri, collection)
        cams = camids if camids is not None else getattr(embeddings, "camids", None)
        index = cls.create(location, embeddings.dim, metric, named=class_names is not None, source=source,
                           replace=replace, timeout=timeout, **params)
        try:
            if class_names is not None:
                index._register(list(class_names))  # label i is class_names[i], as in an index file
            index.add(embeddings.vectors, embeddings.labels, embeddings.paths, class_names=class_names, camids=cams)
        except BaseException:
            index.close()
            raise
        return index

    @classmethod
    def open(cls, spec: str | Location, timeout: Optional[float] = None) -> "MilvusIndex":
        """The index at ``spec`` (``milvus://...``, or a :class:`Location`); one line if there is none."""
        location = spec if isinstance(spec, Location) else Location.of_spec(spec)
        client = connect(location, timeout=timeout)
        try:
            with milvus_errors(location, "opening the collection"):
                meta = read_meta(client, location)
                fields = {f["name"]: f for f in client.describe_collection(location.collection)["fields"]}
                dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
                missing = [f for f in ("vector", "label", "label_name", "path", "camera") if f not in fields]
                if missing or dim != int(meta["dim"]):
                    raise SearchIndexError(f"{location}: the collection does not have the fields deepmetric made "
                                           f"(missing {missing}, vector dim {dim} for {meta['dim']}); rebuild it")
                client.load_collection(location.collection)
        except BaseException:
            client.close()
            raise
        return cls(client, location, meta)

    @staticmethod
    def default_items_dir(spec: str) -> str:
        """Where a server keeps uploaded images by default: beside a Milvus Lite file, else in the working folder."""
        location = Location.of_spec(spec)
        suffix = "" if location.collection == DEFAULT_COLLECTION else f".{location.collection}"
        return f"{location.uri}{suffix}.items" if location.lite else f"{location.collection}.items"

    def close(self) -> None:
        """Let the collection go (and, for Milvus Lite, its file: for the next process; every index of
        that file in this process with it)."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        if self.location.lite:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.location.uri)

    # -- what it holds --------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._errors("counting"):
            return int(self.client.query(self.location.collection, filter="", output_fields=["count(*)"],
                                         timeout=READ_TIMEOUT_S)[0]["count(*)"])

    def info(self) -> Dict[str, Any]:
        """Backend, metric, dim, count, mode, parameters, source, and where it lives."""
        return {"backend": self.backend_name, "metric": self.metric, "dim": self.dim, "count": len(self),
                "mode": self.mode, "params": {**self.meta["params"], **self.search_params}, "source": self.source,
                "uri": self.location.spec}

    @property
    def unnamed_labels(self) -> bool:
        """Whether the labels are numbers without class names (built from a list file) and some are set."""
        return not self.meta["named"] and bool(self._query("label >= 0", ["id"], limit=1))

    def label_name(self, label: int) -> Optional[str]:
        """The class name of ``label``, or None."""
        return self._names_of_labels([int(label)]).get(int(label))

    def items(self, ids: Sequence[int]) -> List[Tuple[int, int, Optional[str], Optional[str]]]:
        """``(id, label, label name, path)`` of each id; :class:`UnknownItemError` for one there is not."""
        rows = self._rows_of_ids(ids)
        return [(i, int(rows[i]["label"]), rows[i]["label_name"] or None, rows[i]["path"] or None)
                for i in (int(v) for v in ids)]

    def path_of(self, item_id: int) -> Optional[str]:
        return self.items([item_id])[0][3]

    def paths_under(self, prefix: str) -> List[str]:
        """The stored paths that start with ``prefix``."""
        pattern = prefix.replace("\\", "\\\\").replace('"', '\\"')
        rows = self._iterate(f'path like "{pattern}%"', ["path"])
        return [r["path"] for r in rows if r["path"].startswith(prefix)]

    # -- search ---------------------------------------------------------------------------------------

    def set_search_params(self, **params: Any) -> None:
        """``ef_search`` (HNSW) and ``nprobe`` (IVF)."""
        unknown = set(params) - set(SEARCH_PARAMS)
        if unknown:
            raise SearchIndexError(f"backend milvus: {sorted(unknown)} cannot change at search time (search "
                                   f"parameters: {', '.join(SEARCH_PARAMS)})")
        self.search_params.update(check_params(params))
        self.search_params.pop("index_type", None)

    def search(self, queries: Any, k: int = 10, filter: Any = None) -> List[List[Hit]]:
        """The ``k`` nearest items of each query ``(Q, D)`` (or one ``(D,)``), best first; ``filter``: an
        :class:`~deepmetric.inference.filters.ItemFilter` or a Milvus expression (one, or one per query)."""
        found = self._search(queries, k, filter, _OUT)
        return [[Hit(int(h["id"]), float(h["distance"]), int(h["entity"]["label"]), h["entity"]["path"] or None,
                     h["entity"]["label_name"] or None) for h in hits] for hits in found]

    def search_arrays(self, queries: Any, k: int = 10, filter: Any = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k), ids (Q, k))`` best first; ids -1 (scores NaN) where there are fewer hits."""
        hits = self._search(queries, k, filter, [])
        scores, ids = np.full((len(hits), k), np.nan, np.float32), np.full((len(hits), k), -1, np.int64)
        for i, row in enumerate(hits):
            scores[i, :len(row)] = [h["distance"] for h in row]
            ids[i, :len(row)] = [h["id"] for h in row]
        return scores, ids

    def _search(self, queries: Any, k: int, filter: Any, fields: List[str]) -> List[List[Dict[str, Any]]]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise SearchIndexError(f"search: k must be an integer from 1 to {MAX_K} (Milvus's limit), got {k!r}")
        q = as_matrix(queries, self.dim, "MilvusIndex.search queries")
        check_finite(q, "MilvusIndex.search: query")
        q = l2_normalize(q)
        search_with_params()  # Milvus Lite 3 runs FAISS here; torch_utils may have been imported since we connected
        out: List[List[Dict[str, Any]]] = [[] for _ in range(len(q))]
        params = {"metric_type": "IP", "params": {SEARCH_PARAMS[k_]: v for k_, v in self.search_params.items()}}
        for f, rows in groups(per_query(filter, len(q))):
            expr = f.expression() if isinstance(f, ItemFilter) else (f or "")
            for start in range(0, len(rows), 256):
                part = rows[start:start + 256]
                with self._errors("searching"):
                    res = self.client.search(self.location.collection, data=list(q[part]), limit=int(k), filter=expr,
                                             output_fields=fields, search_params=params, timeout=READ_TIMEOUT_S)
                for r, hits in zip(part.tolist(), res):
                    out[r] = list(hits)
        return out

    # -- changes --------------------------------------------------------------------------------------

    def add(self, vectors: Any, labels: Optional[Sequence[int]] = None, paths: Optional[Sequence[Optional[str]]] = None,
            class_names: Optional[Sequence[str]] = None, camids: Optional[Sequence[int]] = None) -> np.ndarray:
        """Add ``(N, D)`` vectors with labels, paths, class names (labels index them) and camera ids;
        returns the ids Milvus gave them. As :meth:`~.index.SearchIndex.add`."""
        return self.add_batch(self.check_batch(vectors, labels, paths, class_names, camids))

    def check_batch(self, vectors: Any, labels: Optional[Sequence[int]] = None,
                    paths: Optional[Sequence[Optional[str]]] = None, class_names: Optional[Sequence[str]] = None,
                    camids: Optional[Sequence[int]] = None) -> MilvusBatch:
        """The arguments of :meth:`add`, checked without changing the index."""
        x = as_matrix(vectors, self.dim, "MilvusIndex.add")
        n = len(x)
        lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
        cam = np.full(n, -1, np.int64) if camids is None else np.asarray(camids, np.int64).reshape(-1)
        pth = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        if not len(lab) == len(cam) == len(pth) == n:
            raise SearchIndexError(f"MilvusIndex.add: {n} vectors but {len(lab)} labels, {len(pth)} paths and "
                                   f"{len(cam)} camera ids")
        check_finite(x, "MilvusIndex.add", pth)
        if n and (int(lab.min()) < -1 or int(cam.min()) < -1):
            raise SearchIndexError("MilvusIndex.add: labels and camera ids are >= 0, or -1 for unknown")
        long = [p for p in pth if p and len(p.encode()) > MAX_PATH]
        names = None if class_names is None else [str(c) for c in class_names]
        if long or any(len(c.encode()) > MAX_NAME for c in names or []):
            raise SearchIndexError(f"MilvusIndex.add: paths hold at most {MAX_PATH} bytes and class names {MAX_NAME}")
        if names is not None and n and int(lab.max()) >= len(names):
            raise SearchIndexError(f"label {int(lab.max())} has no class name (there are {len(names)})")
        return MilvusBatch(x, lab, pth, names, cam)

    def add_batch(self, batch: MilvusBatch) -> np.ndarray:
        """Add a batch :meth:`check_batch` made; the new ids. Rows go in by inserts of at most 16 MB; if one
        fails, the error says which ids the earlier ones added."""
        labels, names = self._labels_and_names(batch.labels, batch.class_names)
        x = l2_normalize(batch.vectors)
        cams = batch.camids if batch.camids is not None else np.full(len(x), -1, np.int64)
        step = max(1, min(10_000, (16 << 20) // (4 * self.dim + 2 * MAX_NAME)))
        ids: List[int] = []
        for s in range(0, len(x), step):
            rows = [{"vector": x[i], "label": int(labels[i]), "label_name": names[i], "path": batch.paths[i] or "",
                     "camera": int(cams[i])} for i in range(s, min(s + step, len(x)))]
            try:
                with self._errors("adding", changing=True):
                    done = self.client.insert(self.location.collection, rows, timeout=WRITE_TIMEOUT_S)
                ids += [int(i) for i in done["ids"]]
            except SearchIndexError as e:
                if ids:
                    raise type(e)(f"{e} (after {len(ids)} of {len(x)} items were added: ids {few(ids)}; remove them "
                                  "or add the rest)") from None
                raise
        self.changes += 1
        return np.asarray(ids, np.int64)

    def select(self, ids: Optional[Sequence[int]] = None, paths: Optional[Sequence[str]] = None,
               labels: Optional[Sequence[Any]] = None) -> np.ndarray:
        """The ids :meth:`remove` would remove, ascending; the index is not changed."""
        if ids is None and paths is None and labels is None:
            raise SearchIndexError("remove: name the items to remove by ids, paths or labels")
        found = set()
        if ids is not None:
            found |= set(self._rows_of_ids(ids))
        if paths is not None:
            want = list(dict.fromkeys([str(p) for p in paths] + [os.path.abspath(p) for p in paths]))
            rows = self.rows_in("path", want, ["path"])
            stored = {r["path"] for r in rows}
            missing = [p for p in paths if str(p) not in stored and os.path.abspath(p) not in stored]
            if missing:
                raise UnknownItemError(f"no item with path {few(missing, 3)} in {self.location}")
            found |= {int(r["id"]) for r in rows}
        if labels is not None:
            found |= self._ids_of_labels(labels)
        out = np.asarray(sorted(found), np.int64)
        if len(out) and not self._more_than(len(out)):
            raise SearchIndexError(f"remove: that would remove all {len(out)} items, and an index needs at least one; "
                                   "build a new index instead")
        return out

    def remove(self, ids: Optional[Sequence[int]] = None, paths: Optional[Sequence[str]] = None,
               labels: Optional[Sequence[Any]] = None) -> np.ndarray:
        """Remove items by id, path or label (number or class name); the removed ids, ascending."""
        removed = self.select(ids, paths, labels)
        for s in range(0, len(removed), 10_000):
            with self._errors("removing", changing=True):
                self.client.delete(self.location.collection, filter=in_list("id", removed[s:s + 10_000].tolist()),
                                   timeout=WRITE_TIMEOUT_S)
        if len(removed):
            self.changes += 1
        return removed

    def compaction(self, force: bool = False) -> None:
        return None  # Milvus compacts its segments itself

    def snapshot(self, copy: bool = True) -> Any:
        raise SearchIndexError(f"{self.location}: a Milvus index has no file to save; Milvus keeps every change")

    # -- labels and names -----------------------------------------------------------------------------

    def _labels_and_names(self, labels: np.ndarray, names: Optional[List[str]]) -> Tuple[np.ndarray, List[str]]:
        """The collection's label and class name of each row: names are matched to the collection's own
        (new names get new labels, written to the metadata before any item uses them)."""
        if names is None:
            named = self._names_of_labels(sorted(set(labels.tolist()) - {-1}))
            top = int(labels.max(initial=-1)) + 1
            if top > self.meta["next_label"]:
                self._update_meta(next_label=top)
            return labels, [named.get(int(v), "") for v in labels.tolist()]
        used = set(names[v] for v in labels.tolist() if v >= 0)
        own = self._register([c for c in names if c in used])
        mapping = np.array([own.get(c, -1) for c in names] + [-1], np.int64)  # label -1 reads the last entry
        return mapping[labels], [names[v] if v >= 0 else "" for v in labels.tolist()]

    def _register(self, names: List[str]) -> Dict[str, int]:
        """The label of each class name; names the index lacks get the next labels, in order (written
        to the metadata before any item uses them)."""
        own = self._labels_of_names(names)
        new = [c for c in dict.fromkeys(names) if c not in own]
        if new:
            if not self.meta["named"]:
                if self.unnamed_labels:
                    raise SearchIndexError("the index has labels but no class names (built from a list file), so "
                                           "labels named by class cannot be matched to its own; add embeddings of "
                                           "a list file")
                self._update_meta(named=True)
            first = int(self.meta["next_label"])
            self._update_meta(next_label=first + len(new))
            own.update({c: first + i for i, c in enumerate(new)})
            self._put_classes({c: own[c] for c in new})
        return own

    def _labels_of_names(self, names: Sequence[str]) -> Dict[str, int]:
        rows = self.rows_in("key", [f"class:{c}" for c in dict.fromkeys(names)], ["key", "label"], meta=True)
        return {r["key"][len("class:"):]: int(r["label"]) for r in rows}

    def _names_of_labels(self, labels: Sequence[int]) -> Dict[int, str]:
        rows = self.rows_in("label", list(labels), ["key", "label"], meta=True)
        return {int(r["label"]): r["key"][len("class:"):] for r in rows if r["key"].startswith("class:")}

    def _ids_of_labels(self, labels: Sequence[Any]) -> set:
        by_name = self._labels_of_names([str(v) for v in labels])
        values, unknown = [], []
        for v in labels:
            if str(v) in by_name:
                values.append(by_name[str(v)])
            elif isinstance(v, (int, np.integer, str)) and not isinstance(v, bool) and str(v).lstrip("-").isdigit():
                values.append(int(v))
            else:
                unknown.append(v)
        rows = self.rows_in("label", values, ["label"])
        unknown += [v for v in values if v not in {int(r["label"]) for r in rows}]
        if unknown:
            raise UnknownItemError(f"no item has label {few(unknown, 5)} in {self.location}")
        return {int(r["id"]) for r in rows}

    def _rows_of_ids(self, ids: Sequence[int]) -> Dict[int, Dict[str, Any]]:
        want = np.asarray(ids).reshape(-1)
        if want.size and want.dtype.kind not in "iu":
            raise SearchIndexError(f"item ids must be integers, got {few(want.tolist())}")
        rows = {int(r["id"]): r for r in self.rows_in("id", want.tolist(), _OUT)}
        missing = [int(i) for i in want.tolist() if int(i) not in rows]
        if missing:
            raise UnknownItemError(f"no item with id {few(missing)} in {self.location} (ids of removed items are "
                                   "never reused)")
        return rows

    # -- Milvus calls ---------------------------------------------------------------------------------

    def _errors(self, doing: str, changing: bool = False):
        return milvus_errors(self.location, doing, changing)

    def _more_than(self, n: int) -> bool:
        """Whether the collection holds more than ``n`` items (a query of ``n + 1`` rows where Milvus allows
        it: cheaper than counting all)."""
        if n + 1 > MAX_K:
            return len(self) > n
        return len(self._query("", ["id"], limit=n + 1)) > n

    def _query(self, expr: str, fields: List[str], limit: int, meta: bool = False) -> List[Dict[str, Any]]:
        name = meta_name(self.location.collection) if meta else self.location.collection
        with self._errors("reading"):
            return list(self.client.query(name, filter=expr, output_fields=fields, limit=limit, timeout=READ_TIMEOUT_S))

    def _iterate(self, expr: str, fields: List[str], meta: bool = False) -> List[Dict[str, Any]]:
        """Every row matching ``expr``: one query, or (where that fills Milvus's 16384-row window) all pages
        of a query iterator, which costs many queries."""
        if not expr:
            return []
        name = meta_name(self.location.collection) if meta else self.location.collection
        with self._errors("reading"):
            out = list(self.client.query(name, filter=expr, output_fields=fields, limit=MAX_K, timeout=READ_TIMEOUT_S))
            if len(out) < MAX_K:
                return out
            out = []
            it = self.client.query_iterator(name, batch_size=4096, filter=expr, output_fields=fields,
                                            timeout=READ_TIMEOUT_S)
            try:
                while True:
                    page = it.next()
                    if not page:
                        return out
                    out += list(page)
            finally:
                it.close()

    def rows_in(self, field: str, values: Sequence[Any], fields: List[str], meta: bool = False
                ) -> List[Dict[str, Any]]:
        """The rows (``id`` and ``fields``) whose ``field`` is one of ``values``, asked 1000 values at a time
        (``meta``: of the metadata collection)."""
        values = list(dict.fromkeys(values))
        return [r for s in range(0, len(values), 1000)
                for r in self._iterate(in_list(field, values[s:s + 1000]), fields, meta)]

    def _write_meta(self) -> None:
        with self._errors("writing the metadata", changing=True):
            self.client.upsert(meta_name(self.location.collection),
                               [{"key": "index", "label": -1, "value": json.dumps(self.meta), "vec": [0.0, 0.0]}],
                               timeout=WRITE_TIMEOUT_S)

    def _update_meta(self, **changes: Any) -> None:
        self.meta = {**read_meta(self.client, self.location), **changes}
        self._write_meta()

    def _put_classes(self, labels: Dict[str, int]) -> None:
        rows = [{"key": f"class:{c}", "label": int(v), "value": "", "vec": [0.0, 0.0]} for c, v in labels.items()]
        with self._errors("writing class names", changing=True):
            self.client.upsert(meta_name(self.location.collection), rows, timeout=WRITE_TIMEOUT_S)


def _version() -> str:
    from ..core import __version__

    return f"deepmetric {__version__}"


__all__ = ["MilvusIndex", "MilvusBatch", "Location", "MilvusUnavailableError", "DEFAULT_COLLECTION"]
