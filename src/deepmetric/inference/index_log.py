"""The change log of an index file (``INDEX.wal``): every change a server acknowledged, durable before
it answered.

``deepmetric serve`` changes its index in memory and rewrites the file only every ``--save-every``
changes; in between, each add and remove is appended here and fsynced before the 2xx. The file plus its
log is the index: :meth:`~deepmetric.inference.index.SearchIndex.load` replays the log's changes that
the file does not hold yet, so a crash loses nothing that was acknowledged.

Layout: records, each ``b"DMLR" | u32 payload length | u32 CRC-32 of the payload | payload``
(little-endian). The first record's payload is JSON ``{"format": "deepmetric-index-log", "version": 1,
"lineage": L}``: the log continues the index of that lineage (:mod:`~deepmetric.inference.index_file`).
Each change's payload is ``u32 JSON length | JSON | data``:

- ``{"op": "add", "seq": S, "first_id": I, "count": N, "labels": [...], "paths": [...], "class_names":
  [...] or null}`` and then the ``N x D`` float32 vectors as they were given to ``add``;
- ``{"op": "remove", "seq": S, "ids": [...]}``.

``seq`` is the index's ``changes`` after the change. Replay applies, in order, the records whose
``seq`` is above the file's ``changes``: the first must be ``changes + 1`` and each the next, or the log
is not this file's continuation (an error). A log of another lineage belongs to an earlier index built
at that path and is ignored, with a warning. A record cut short at the end (the process died while
appending it, so it was never acknowledged) is ignored; damage before the end is an error naming the log.

Saving the file makes records redundant: :meth:`ChangeLog.compact` keeps only those above the saved
``changes``; a crash between the save and the compaction leaves records that replay skips.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.files import atomic_write, fsync_dir
from .index_file import IndexFileError

log = logging.getLogger("deepmetric")

FORMAT = "deepmetric-index-log"
VERSION = 1
MAGIC = b"DMLR"
_FRAME = struct.Struct("<4sII")  # magic, payload length, CRC-32
_MAX_JSON = 1 << 28


def log_path(index_path: Path) -> Path:
    """Where the change log of the index file ``index_path`` lives: ``INDEX.wal`` beside it."""
    return index_path.with_name(index_path.name + ".wal")


@dataclass(frozen=True)
class Change:
    """One logged change: ``op`` ``"add"`` (``vectors (N, D)``, ``labels``, ``paths``, ``class_names``,
    ``first_id``: the index's ``next_id`` before it) or ``"remove"`` (``ids``); ``seq`` as above."""

    op: str
    seq: int
    meta: Dict[str, Any]
    vectors: Optional[np.ndarray] = None


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _change_payload(meta: Dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(meta, separators=(",", ":")).encode()
    return struct.pack("<I", len(text)) + text + data


def _frames(data: bytes, path: Path) -> Tuple[List[Tuple[int, int, bytes]], int]:
    """The intact records of ``data`` as ``(start, end, payload)``, and where they end: a damaged record
    with no intact one after it is a torn tail (ignored); one with an intact record after it is damage."""
    out, pos = [], 0
    while pos < len(data):
        payload = _frame_at(data, pos)
        if payload is None:
            later = data.find(MAGIC, pos + 1)
            while later != -1:
                if _frame_at(data, later) is not None:
                    raise IndexFileError(f"{path}: the change log is damaged at byte {pos} (intact records follow); "
                                         "move it away to use the index file as it was last saved")
                later = data.find(MAGIC, later + 1)
            break
        end = pos + _FRAME.size + len(payload)
        out.append((pos, end, payload))
        pos = end
    return out, pos


def _frame_at(data: bytes, pos: int) -> Optional[bytes]:
    if len(data) - pos < _FRAME.size:
        return None
    magic, length, crc = _FRAME.unpack_from(data, pos)
    payload = data[pos + _FRAME.size:pos + _FRAME.size + length]
    if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload


def _parse_change(payload: bytes, dim: int) -> Change:
    (n,) = struct.unpack_from("<I", payload)
    if not 0 < n <= min(len(payload) - 4, _MAX_JSON):
        raise ValueError("a record's JSON length is out of range")
    meta = json.loads(payload[4:4 + n].decode())
    data = payload[4 + n:]
    if not isinstance(meta, dict) or meta.get("op") not in ("add", "remove") or \
            not isinstance(meta.get("seq"), int) or isinstance(meta.get("seq"), bool):
        raise ValueError("a record without a known op and an integer seq")
    if meta["op"] == "remove":
        return Change("remove", meta["seq"], meta)
    count = meta.get("count")
    if not isinstance(count, int) or count < 0 or len(data) != 4 * count * dim:
        raise ValueError(f"an add of {count!r} vectors with {len(data)} bytes of {dim}-d float32")
    return Change("add", meta["seq"], meta, np.frombuffer(data, "<f4").reshape(count, dim).astype(np.float32))


def read(path: Path, dim: int) -> Tuple[str, List[Change]]:
    """``(lineage, changes)`` of the log at ``path``; :class:`IndexFileError` names it if it is damaged."""
    data = path.read_bytes()
    frames, _ = _frames(data, path)
    try:
        if not frames:
            raise ValueError("no header record")
        head = json.loads(frames[0][2].decode())
        if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("version") != VERSION \
                or not isinstance(head.get("lineage"), str):
            raise ValueError(f"not a {FORMAT} version {VERSION} header")
        return head["lineage"], [_parse_change(p, dim) for _, _, p in frames[1:]]
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path}: not a readable change log ({e}); move it away to use the index file "
                             "as it was last saved") from None


def replay(index: Any, index_path: Path) -> int:
    """Apply to ``index`` (just loaded from ``index_path``) the changes of its log it does not hold yet;
    returns how many. Nothing happens without a log, or with the log of another lineage (a warning)."""
    path = log_path(index_path)
    if not path.is_file():
        return 0
    lineage, changes = read(path, index.dim)
    if lineage != index.lineage:
        if changes:
            log.warning("%s: a change log of an earlier index built at this path (ignored; the next server or "
                        "'deepmetric index add/remove' of this index replaces it)", path)
        return 0
    applied = 0
    for change in changes:
        if change.seq <= index.changes:
            continue  # already in the file: saved after this record was logged
        if change.seq != index.changes + 1:
            raise IndexFileError(f"{path}: the log continues from change {change.seq - 1}, the index file holds "
                                 f"{index.changes}; move the log away to use the file as it was last saved")
        try:
            _apply(index, change)
        except (ValueError, KeyError, TypeError, IndexError) as e:  # SearchIndexError is a ValueError
            raise IndexFileError(f"{path}: change {change.seq} does not apply to the index ({e}); move the log "
                                 "away to use the file as it was last saved") from None
        applied += 1
    if applied:
        log.info("%s: replayed %d acknowledged changes the index file did not hold yet", index_path, applied)
    return applied


def _apply(index: Any, change: Change) -> None:
    m = change.meta
    if change.op == "remove":
        index.remove(ids=[int(i) for i in m["ids"]])
        return
    batch = index.check_batch(change.vectors, m["labels"], m["paths"], m.get("class_names"))
    if index.next_id != m["first_id"]:
        raise ValueError(f"it was logged for next id {m['first_id']}, the index is at {index.next_id}")
    index.add_batch(batch)


def discard(index_path: Path) -> None:
    """Remove the log of ``index_path`` (its changes are in the file now)."""
    path = log_path(index_path)
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


class ChangeLog:
    """The log a server appends to (one writer; its caller serialises the calls). :meth:`start` makes a
    new one, :meth:`append_add` / :meth:`append_remove` write a record and fsync it (the change is then
    durable), :meth:`rollback` cuts back a record whose change could not be applied, :meth:`compact`
    drops the records a saved file holds."""

    def __init__(self, path: Path, lineage: str) -> None:
        self.path, self.lineage = path, lineage
        self._head = _frame(json.dumps({"format": FORMAT, "version": VERSION, "lineage": lineage}).encode())
        self._records: List[Tuple[int, int, int]] = []  # (seq, start, end) of the records after the header
        self._file: Any = None
        self.end = 0
        self.damaged = False  # a failed append could not be cut back: append nothing more

    @classmethod
    def start(cls, index_path: Path, lineage: str) -> "ChangeLog":
        """An empty log for the index at ``index_path`` (of ``lineage``), replacing any old one atomically."""
        self = cls(log_path(index_path), lineage)
        self._rewrite(b"", [])
        return self

    def _rewrite(self, tail: bytes, records: List[Tuple[int, int, int]]) -> None:
        atomic_write(self.path, self._head + tail)
        if self._file is not None:
            self._file.close()
        self._file = open(self.path, "r+b")
        self._records, self.end = records, len(self._head) + len(tail)

    def append_add(self, batch: Any, seq: int, first_id: int) -> int:
        """Log the add of ``batch`` (:class:`~deepmetric.inference.index.Batch`) as change ``seq``;
        returns the offset to :meth:`rollback` to."""
        meta = {"op": "add", "seq": seq, "first_id": int(first_id), "count": len(batch.vectors),
                "labels": [int(v) for v in batch.labels], "paths": list(batch.paths), "class_names": batch.class_names}
        return self._append(seq, _change_payload(meta, np.ascontiguousarray(batch.vectors, "<f4").tobytes()))

    def append_remove(self, ids: Sequence[int], seq: int) -> int:
        return self._append(seq, _change_payload({"op": "remove", "seq": seq, "ids": [int(i) for i in ids]}))

    def _append(self, seq: int, payload: bytes) -> int:
        start, data = self.end, _frame(payload)
        try:
            self._file.seek(start)
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            try:
                self.rollback(start)
            except BaseException:  # a partial record stays: no later record may follow it
                self.damaged = True
            raise
        self.end = start + len(data)
        self._records.append((seq, start, self.end))
        return start

    def rollback(self, offset: int) -> None:
        """Cut the log back to ``offset`` (a record not acknowledged); raises if it cannot."""
        self._file.truncate(offset)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.end = offset
        self._records = [r for r in self._records if r[2] <= offset]

    def compact(self, saved: int) -> None:
        """Keep only the records above change ``saved`` (the file holds the rest), atomically."""
        keep = [r for r in self._records if r[0] > saved]
        if len(keep) == len(self._records):
            return
        tail = b""
        if keep:
            self._file.seek(keep[0][1])
            tail = self._file.read(self.end - keep[0][1])
        shift = len(self._head) - (keep[0][1] if keep else 0)
        self._rewrite(tail, [(s, a + shift, b + shift) for s, a, b in keep])

    @property
    def pending(self) -> int:
        """Records the saved file does not hold yet (since the last compaction)."""
        return len(self._records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
