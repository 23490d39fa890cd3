"""The served index and all that changes it: :class:`LiveGallery` keeps the index in memory, its file,
its change log and the items' image files in step, so that what a client was told is what a restart
finds.

A change (``POST /items``, ``DELETE /items/{id}``) runs under the index's write lock:

1. it is checked completely (labels, vector sizes, NaN, ids), so that applying it cannot fail;
2. it is appended to the change log ``INDEX.wal`` and fsynced (:mod:`deepmetric.inference.index_log`).
   From here it survives any crash. If the disk refuses (full, read-only), the client gets 507 (no
   space) or 500, with JSON, and nothing changed;
3. it is applied to the index in memory (should that fail, the log record is cut back);
4. only then is a removed item's image file unlinked (an added item's was written and fsynced before 2).

Then the 2xx. Every ``save_every`` changes a background thread rewrites the index file (a snapshot,
copied under the read lock and written outside any lock, atomically) and compacts the log; when the
server stops it is saved once more and the log removed. ``save_every`` sets how long the log grows and
how much a restart replays, never what survives a crash; with 0 the file is written only when the
server stops.

The server owns the file while it runs (:func:`deepmetric.inference.index_lock.serving`: an offline
``deepmetric index add / remove`` is refused), and starts by replaying the log, saving the file if the
log held changes, removing stale temporary files of the index and orphaned images
(:class:`~.item_files.ItemFiles`).

An index that keeps each change itself (``index.durable``: a Milvus collection,
:mod:`deepmetric.inference.milvus_backend`) is served with no file, change log or lock of ours: a change
goes to the collection under the write lock, and is durable as Milvus makes it once the call returns;
image files are still written before it and unlinked after it. Its ids come from Milvus, stable and
never reused, so several servers may serve one Milvus cluster (a Milvus Lite file opens in one process).

Searches and changes share the index under :class:`IndexLock`: any number of searches at once, a change
alone. ``/health`` reads :attr:`LiveGallery.info`, published after each change: it never waits on the
lock. ``faiss-hnsw`` removals are tombstones; once a quarter of the graph is dead, a background thread
rebuilds it (:class:`~deepmetric.inference.hnsw.HNSWCompaction`: copied under the read lock, built with
no lock, swapped in under the write lock), so no request waits for a rebuild.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..core.errors import UserError
from ..inference import index_file, index_lock, index_log
from ..inference.index import BACKENDS, SearchIndexError, UnknownItemError
from .item_files import ItemFiles

log = logging.getLogger("deepmetric")

_NUMBER = re.compile(r"^[0-9]{1,18}$")  # a label of a list-file index: ASCII digits, within int64
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class IndexLock:
    """Many readers or one writer (writers first once waiting, so a change is never starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class ChangeError(UserError):
    """A change the gallery did not make; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def storage_error(e: OSError, what: str) -> ChangeError:
    """507 when the disk is full, else 500: the change was not made."""
    status = 507 if e.errno in _NO_SPACE else 500
    return ChangeError(status, f"{what} could not be written ({e.strerror or e}); nothing was changed, retry later")


@dataclass(frozen=True)
class Added:
    """An item as the add made it: stable id, label, its name, stored path."""

    id: int
    label: int
    label_name: Optional[str]
    path: Optional[str]


class LiveGallery:
    """``index`` as served, with (when ``index_path`` is given) its file, change log and lock, and the
    image files under ``items_dir`` (None: items are added without an image). Without ``index_path``
    changes live in memory only. Make it with :meth:`open`; :meth:`close` when the server stops."""

    def __init__(self, index: Any, items_dir: Optional[Path] = None, index_path: Optional[Path] = None,
                 save_every: int = 100) -> None:
        if getattr(index, "durable", False) and index_path is not None:
            raise ValueError("an index that keeps its own changes (a database) is served without index_path")
        self.index, self.lock = index, IndexLock()
        self.index_path = None if index_path is None else Path(index_path)
        self.items_dir = None if items_dir is None else Path(items_dir)
        self.save_every = int(save_every)
        self.files: Optional[ItemFiles] = None
        self.log: Optional[index_log.ChangeLog] = None
        self.owner: Optional[index_lock.ServerLock] = None
        self.closed = self.broken = False
        self._log_mutex, self._save_mutex, self._close_mutex = threading.Lock(), threading.Lock(), threading.Lock()
        self._compacting = self._saving = self._saved_last = False
        self.info: Dict[str, Any] = {}
        self._publish()

    @classmethod
    def open(cls, index: Any, items_dir: Optional[Path] = None, index_path: Optional[Path] = None,
             save_every: int = 100, load: Optional[Callable[[Path], Any]] = None) -> "LiveGallery":
        """The gallery of ``index``, or (``index`` None) of the file ``index_path`` loaded with ``load``
        once the lock is held. With ``index_path``: the lock is taken, the log replayed (by ``load``)
        and a fresh one started, stale files removed; a problem is one :class:`UserError`."""
        if index_path is None:  # in memory, or an index that keeps its own changes
            gallery = cls(index, items_dir, None, save_every)
            if items_dir is not None:
                ours = index.paths_under(f"{Path(items_dir).resolve()}{os.sep}")
                gallery.files = ItemFiles.open(items_dir, None, ours)
            return gallery
        index_path = Path(index_path)
        owner = index_lock.serving(index_path)
        try:
            index = load(index_path) if index is None else index
            gallery = cls(index, items_dir, index_path, save_every)
            gallery.owner = owner
            gallery._start()
        except BaseException:
            owner.release()
            raise
        return gallery

    def _start(self) -> None:
        path, index = self.index_path, self.index
        try:
            on_disk = index_file.read_header(path, BACKENDS) if path.exists() else {}
        except UserError:
            on_disk = {}
        try:
            stale = [p for p in path.parent.iterdir()
                     if p.name.startswith(f".{path.name}.") and p.name.endswith(".tmp") and p.is_file()]
            for p in stale:  # our atomic writes that a crash interrupted (we hold the lock: none is running)
                p.unlink(missing_ok=True)
            if stale:
                log.info("%s: removed %d temporary files left by an interrupted save", path.parent, len(stale))
            if (on_disk.get("lineage"), on_disk.get("changes")) != (index.lineage, index.changes):
                index.save(path)  # the replayed changes (or a new index) into the file, before a new log
            self.log = index_log.ChangeLog.start(path, index.lineage)
        except OSError as e:
            raise UserError(f"{path}: cannot write the index or its change log there ({e.strerror or e}); a server "
                            "that changes the index needs a writable folder (or serve without an API key: read-only)"
                            ) from None
        if self.items_dir is not None:
            self.files = ItemFiles.open(self.items_dir, path, index.paths)
            self.files.clean()

    def _publish(self) -> None:
        """What ``/health`` shows, replaced whole after each change (read without the lock)."""
        self.info = {k: v for k, v in self.index.info().items() if k != "source"}

    # -- changes -----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ChangeError(503, "the server is stopping: no more changes; retry when it is back")
        if self.broken or (self.log is not None and self.log.damaged):
            raise ChangeError(503, f"the change log {self.log.path if self.log else ''} could not be repaired "
                                   "after a failed write; restart the server (nothing acknowledged is lost)")

    def _logged(self, append: Callable[[index_log.ChangeLog], int]) -> Optional[int]:
        """Append a record (durable when this returns); its offset, or None without a log."""
        if self.log is None:
            return None
        with self._log_mutex:
            try:
                return append(self.log)
            except OSError as e:
                raise storage_error(e, f"the change log {self.log.path}") from None

    def _undo(self, offset: Optional[int]) -> None:
        if offset is not None:
            with self._log_mutex:
                try:
                    self.log.rollback(offset)
                except OSError:
                    self.broken = True

    def add(self, vectors: Any, uploads: Sequence[Tuple[Optional[str], bytes]], labels: Sequence[str]
            ) -> Tuple[List[Added], int]:
        """Add embedded uploads ``(name, bytes)`` with form ``labels``; the new items and the new count."""
        self._check_open()
        try:
            paths = self.files.write(uploads) if self.files else [None] * len(uploads)
        except OSError as e:
            raise storage_error(e, "the uploaded image") from None
        try:
            with self.lock.writing():
                self._check_open()
                lab, names = self._labels(labels, len(uploads))
                try:
                    batch = self.index.check_batch(vectors, lab, paths, names)
                except SearchIndexError as e:
                    raise ChangeError(422, str(e)) from None
                offset = self._logged(lambda lg: lg.append_add(batch, self.index.changes + 1, self.index.next_id))
                try:
                    ids = self.index.add_batch(batch)
                except BaseException:
                    self._undo(offset)
                    raise
                out = self._added(ids)
                if self.files:
                    self.files.adopt([a.path for a in out if a.path in paths])
                self._publish()
                count = len(self.index)
        finally:
            if self.files:
                self.files.discard(paths)  # those no item took (a failed add; centroid members)
        self._after_change()
        return out, count

    def _added(self, ids: Any) -> List[Added]:
        return [Added(*item) for item in self.index.items(ids)]

    def remove(self, item_id: int) -> Tuple[List[int], int]:
        """Remove item ``item_id``; the removed ids and the new count. :class:`UnknownItemError` (404) and
        :class:`SearchIndexError` for the last item (409) come from the index."""
        self._check_open()
        with self.lock.writing():
            self._check_open()
            ids = self.index.select(ids=[item_id])
            paths = [self.index.path_of(int(i)) for i in ids] if self.index.mode == "items" else []
            offset = self._logged(lambda lg: lg.append_remove(ids, self.index.changes + 1))
            try:
                self.index.remove(ids=ids)
            except BaseException:
                self._undo(offset)
                raise
            if self.files:
                self.files.release(paths)  # the removal is durable: its image may go
            self._publish()
            count = len(self.index)
        self._after_change()
        return [int(i) for i in ids.tolist()], count

    def _labels(self, labels: Sequence[str], n: int) -> tuple:
        """Form labels -> ``(labels (n,), class names or None)``: one for all, one per file, or none."""
        labels = [s.strip() for s in labels]
        if not labels or labels == [""]:
            return [-1] * n, None
        if len(labels) == 1:
            labels = labels * n
        if len(labels) != n:
            raise ChangeError(422, f"{len(labels)} labels for {n} files: send one label for all, or one per file")
        index = self.index
        if index.unnamed_labels:  # a list-file index: numeric labels
            bad = [s for s in labels if not _NUMBER.match(s)]
            if bad:
                raise ChangeError(422, f"label {bad[0][:40]!r}: this index has numeric labels and no class names: "
                                       "send labels as whole numbers from 0 to 18 digits")
            return [int(s) for s in labels], None
        names = sorted(set(labels))
        position = {c: i for i, c in enumerate(names)}
        return [position[s] for s in labels], names

    def _after_change(self) -> None:
        if self.log is not None and self.save_every and self.log.pending >= self.save_every and not self._saving:
            self._saving = True  # the change is durable already: no client waits for the file

            def run() -> None:
                try:
                    self.save()
                finally:
                    self._saving = False

            threading.Thread(target=run, name="deepmetric-save", daemon=True).start()
        self._compact_in_background()

    # -- snapshots and compaction ----------------------------------------------------------------

    def save(self, wait: bool = True) -> bool:
        """Write the index file now (a snapshot) and compact the log; False if it was not written (another
        save is running and ``wait`` is False, or the disk refused: the log keeps the changes)."""
        if self.index_path is None or self.log is None:
            return False
        if not self._save_mutex.acquire(blocking=wait):
            return False
        try:
            if self._saved_last:  # closed: the last save is done and the log gone
                return False
            with self.lock.reading():
                if not self.log.pending:
                    return True
                snap = self.index.snapshot()
            try:
                snap.save(self.index_path)
                with self._log_mutex:
                    self.log.compact(snap.changes)
            except OSError as e:
                log.warning("could not save %s (%s); the changes stay in %s and are replayed on restart; the "
                            "next save is tried after the next change", self.index_path, e.strerror or e, self.log.path)
                return False
            return True
        finally:
            self._save_mutex.release()

    def _compact_in_background(self) -> None:
        backend = getattr(self.index, "backend", None)  # a database index has none: it compacts itself
        if backend is None or self._compacting or self.closed or backend.slots == len(self.index):
            return  # nothing removed is kept (a read without the lock: a hint, checked again under it)
        with self.lock.reading():
            job = self.index.compaction()  # copies the live vectors
        if job is None:
            return
        self._compacting = True

        def run() -> None:
            try:
                job.build()
                with self.lock.writing():
                    if not self.closed:
                        job.install()
            except Exception:  # noqa: BLE001 - a failed rebuild leaves the tombstoned graph serving
                log.exception("rebuilding the faiss-hnsw graph failed; it keeps serving with its removed rows")
            finally:
                self._compacting = False

        threading.Thread(target=run, name="deepmetric-compaction", daemon=True).start()

    def close(self) -> None:
        """Stop changes, save the index file and remove the log (it stays if the save fails: the next
        start replays it), release the lock. Safe to call more than once, from any thread."""
        with self._close_mutex:
            if self.closed:
                return
            with self.lock.writing():
                self.closed = True
            try:
                if self.log is not None and self.save(wait=True) and not self.log.pending:
                    with self._save_mutex:
                        self._saved_last = True
                        self.log.close()
                        index_log.discard(self.index_path)
            finally:
                with self._save_mutex:
                    self._saved_last = True
                if self.log is not None:
                    self.log.close()
                if self.owner is not None:
                    self.owner.release()
                close = getattr(self.index, "close", None)  # a database index lets its connection go
                if close is not None:
                    close()
