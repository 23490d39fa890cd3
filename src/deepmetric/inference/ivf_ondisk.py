"""On-disk inverted lists for ``faiss-ivfpq`` (``deepmetric index build --on-disk``).

A streaming build spills each block's list numbers and PQ codes to two temporary files as they come
(:class:`ListSpill`), then lays them out list after list in a sidecar file beside the index, which FAISS
maps into memory read-only (``faiss.OnDiskInvertedLists``, :func:`open_lists`). Neither the build nor a
server holds the codes in RAM; the page cache keeps what searches touch. The layout is written with
``pwrite`` a list segment at a time, not through a writable mapping, so the build's resident memory
stays one block of spilled codes.

Sidecar ``<index file name>.<token>.ivfdata``: a 64-byte header (``DMIVFDAT``, version, nlist, code
size, count, a 16-byte token), then each list in turn: its codes ``(size, code_size) uint8`` and its
rows ``(size,) int64``, FAISS's own on-disk layout with capacity = size. The index file holds the list
sizes, the sidecar's name and the token; a sidecar whose header or size does not match is refused. A
rebuild writes a new sidecar (a new token, so a new name) before the index file is replaced, so the old
index stays whole until the new one is in place (:func:`remove_others` then deletes the old sidecar).
"""
from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write
from .index_file import IndexFileError

MAGIC = b"DMIVFDAT"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIQQQ16s")
SUFFIX = ".ivfdata"
#: rows laid out at a time: 1M rows of 64-byte codes are 68 MB
GROUP_ROWS = 1 << 20


def sidecar_name(index_name: str, token: bytes) -> str:
    return f"{index_name}.{token.hex()}{SUFFIX}"


class ListSpill:
    """The codes of a streaming build on their way to a sidecar beside the index file ``target``."""

    def __init__(self, target: Path, nlist: int, code_size: int) -> None:
        self.target, self.nlist, self.code_size = Path(target), int(nlist), int(code_size)
        self.token = secrets.token_bytes(16)
        self.sizes = np.zeros(self.nlist, np.int64)
        stem = self.target.parent / f".{self.target.name}.{self.token.hex()}"
        self._paths = (Path(f"{stem}.lists"), Path(f"{stem}.codes"))
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._files = [open(p, "xb") for p in self._paths]

    @property
    def count(self) -> int:
        return int(self.sizes.sum())

    def add(self, lists: np.ndarray, codes: np.ndarray) -> None:
        """Spill ``lists (n,)`` (each row's list) and ``codes (n, code_size) uint8``; rows follow on."""
        lists = np.ascontiguousarray(lists, "<i4")
        self._files[0].write(lists.tobytes())
        self._files[1].write(np.ascontiguousarray(codes, np.uint8).tobytes())
        self.sizes += np.bincount(lists, minlength=self.nlist)

    def finish(self) -> Path:
        """Lay the spilled codes out list by list in the sidecar (written atomically); returns its path."""
        for f in self._files:
            f.close()
        cs = self.code_size
        start = HEADER_BYTES + np.concatenate([[0], np.cumsum(self.sizes * (cs + 8))[:-1]]).astype(np.int64)
        code_at, row_at = start.copy(), start + self.sizes * cs
        total = HEADER_BYTES + self.count * (cs + 8)

        def write(f: Any) -> None:
            fd = f.fileno()
            os.ftruncate(fd, total)
            os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, self.nlist, cs, self.count, self.token), 0)
            first = 0
            with open(self._paths[0], "rb") as lf, open(self._paths[1], "rb") as cf:
                while first < self.count:
                    n = min(GROUP_ROWS, self.count - first)
                    lists = np.frombuffer(lf.read(4 * n), "<i4")
                    codes = np.frombuffer(cf.read(n * cs), np.uint8).reshape(n, cs)
                    order = np.argsort(lists, kind="stable")
                    codes, rows = codes[order], (order + first).astype("<i8")
                    bounds = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=self.nlist))])
                    for lst in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
                        a, b = int(bounds[lst]), int(bounds[lst + 1])
                        os.pwrite(fd, codes[a:b], int(code_at[lst]))
                        os.pwrite(fd, rows[a:b], int(row_at[lst]))
                        code_at[lst] += (b - a) * cs
                        row_at[lst] += (b - a) * 8
                    first += n

        try:
            return atomic_write(self.target.parent / sidecar_name(self.target.name, self.token), write)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close and remove the spill files."""
        for f, p in zip(self._files, self._paths):
            f.close()
            p.unlink(missing_ok=True)


def open_lists(faiss: Any, path: Path, sizes: np.ndarray, code_size: int, token: bytes) -> Any:
    """The sidecar at ``path`` as read-only ``faiss.OnDiskInvertedLists`` of ``sizes (nlist,)`` rows, once its
    header (magic, list count, code size, row count, token) and its length are checked
    (:class:`~deepmetric.inference.index_file.IndexFileError` naming the sidecar)."""
    if not path.is_file():
        raise IndexFileError(f"{path}: missing; an index built with --on-disk searches its lists in that file beside "
                             "it (move or copy the two together), or rebuild the index")
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    count = int(sizes.sum())
    if len(head) < _HEADER.size or _HEADER.unpack(head) != (MAGIC, VERSION, len(sizes), code_size, count, token):
        raise IndexFileError(f"{path}: not the on-disk lists of this index (another build's, or damaged); "
                             "rebuild the index")
    total = HEADER_BYTES + count * (code_size + 8)
    if path.stat().st_size != total:
        raise IndexFileError(f"{path}: {path.stat().st_size} bytes, but the index's lists need {total} (truncated?); "
                             "rebuild the index")
    lists = faiss.OnDiskInvertedLists(len(sizes), code_size, str(path))
    lists.lists.clear()
    offset = HEADER_BYTES
    for size in sizes.tolist():
        entry = faiss.OnDiskOneList()
        entry.size = entry.capacity = size
        entry.offset = offset
        lists.lists.push_back(entry)
        offset += size * (code_size + 8)
    lists.totsize = offset
    lists.read_only = True
    lists.do_mmap()
    return lists


def remove_others(index_file: Path, keep: str) -> None:
    """Delete what earlier builds of ``index_file`` left beside it: their sidecars (all but ``keep``) and the
    spill files of a build that was killed."""
    name = index_file.name
    for entry in os.scandir(index_file.parent):
        token = entry.name[len(name) + 1:-len(SUFFIX)] if entry.name.startswith(name + ".") and \
            entry.name.endswith(SUFFIX) else ""
        spill = entry.name.startswith(f".{name}.") and entry.name.endswith((".lists", ".codes"))
        if (len(token) == 32 and entry.name != keep) or spill:
            os.unlink(entry.path)
