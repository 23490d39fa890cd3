"""The search index's file: format 2, a `safetensors <https://github.com/huggingface/safetensors>`_
file any safetensors reader can open.

Arrays: ``ids``, ``labels`` (int64), ``path_offsets``/``path_bytes`` and ``class_offsets``/``class_bytes``
(UTF-8 strings), in centroid mode ``counts`` and ``centroid_sums``, and the backend's own arrays
(``vectors``, ``ivf_centroids``, ``ivf_lists``, ``pq_centroids``, ``pq_codes``, ``hnsw_levels``,
``hnsw_offsets``, ``hnsw_neighbors``, ``hnsw_entry``, ``hnsw_alive``). Its metadata ``header`` is JSON
(backend, metric, dim, count, next id, mode, params, source, class count, each array's CRC-32) with a
CRC-32 of its own. Optional fields (files before them read as their defaults): ``lineage`` (an id
minted when an index is built and kept by every save: it pairs the file with its change log,
:mod:`deepmetric.inference.index_log`), ``changes`` (adds and removes applied since the build; default
0) and ``slots`` (rows the backend stores, removed ones it still keeps included; default ``count``).

FAISS indexes are rebuilt from those arrays after they are checked, never by FAISS's deserialiser, which
trusts its input. Reading refuses a container header over 1 MiB before parsing it, then checks every
header field's type and range, every array's dtype and shape (before reading it), checksum and values:
each allocation is bounded by the bytes the file gives it (Python strings of class names excepted: a
small constant more each); anything wrong is an :class:`IndexFileError` naming the file. Writes are
atomic (:func:`deepmetric.core.files.atomic_write`: temporary file in the same folder, fsync, rename,
fsync of the folder) and honour the umask. Version 1 files (``DMINDEX`` header) are refused with the
command that rebuilds them.
"""
from __future__ import annotations

import json
import operator
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import UserError
from ..core.files import atomic_write
from .backends import FaissMissingError, SearchIndexError

FORMAT = "deepmetric-index"
FORMAT_VERSION = 2
#: what an index holds per item: one vector each, or one per label (the ``mode`` header field)
MODES = ("items", "centroids")
_V1_MAGIC = b"DMINDEX\0"
_MAX_HEADER = 1 << 20  # container header bytes: array table and JSON header (class names are arrays)
_DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U8": np.dtype("u1")}
_CODES = {v: k for k, v in _DTYPES.items()}

#: an array's expected dtype code and shape (None: any length, one dimension)
Spec = Tuple[str, Optional[tuple]]


class IndexFileError(UserError):
    """A file that is not a readable deepmetric index; the message names the file and what is wrong."""


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

    @classmethod
    def join(cls, tables: Sequence["StringTable"]) -> "StringTable":
        """``tables`` one after another, in one copy (``concat`` in a loop copies all that came before, each time)."""
        if not tables:
            return cls()
        lengths = np.concatenate([np.diff(t.offsets) for t in tables])
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.concatenate([t.blob[t.offsets[0]:t.offsets[-1]] for t in tables]), offsets)

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


def write(path: Path, arrays: Dict[str, np.ndarray], header: Dict[str, Any]) -> Path:
    """Write ``arrays`` (little-endian, contiguous) and ``header`` (JSON-ready; the arrays' CRC-32s are
    added) to ``path`` atomically; refuses a header too long to read back."""
    arrays = {k: np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<"), copy=False) for k, v in arrays.items()}
    text = json.dumps({**header, "crc32": {k: zlib.crc32(memoryview(v).cast("B")) for k, v in arrays.items()}})
    if len(text) > _MAX_HEADER // 2:
        raise SearchIndexError(f"{path}: the index's source and parameters are too long to save ({len(text)} characters of JSON)")
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "header": text, "header_crc32": str(_crc_text(text))}
    return atomic_write(path, lambda f: _write_safetensors(f, arrays, meta))


def read(path: Path, open_index: Callable[[Dict[str, Any], Callable[[Dict[str, Spec]], Dict[str, np.ndarray]]], Any],
         backends: Collection[str]) -> Any:
    """Read a format-2 index file: ``open_index(header, read_arrays)`` makes the index from the header,
    checked (its backend one of ``backends``), calling ``read_arrays(expected)`` for the arrays it expects
    (names -> :data:`Spec`), which are checked before and after they are read. Every error is an
    :class:`IndexFileError` naming ``path``."""
    _check_file_start(path)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise SearchIndexError(f"{path}: reading an index needs the safetensors package, which is not installed: "
                             "pip install 'deepmetric[train]'") from None
    try:
        with safe_open(str(path), framework="numpy") as f:
            h = _parse_header(f.metadata() or {}, backends)
            return open_index(h, lambda expected: _read_arrays(f, h, expected))
    except SafetensorError as e:
        raise IndexFileError(f"{path}: not a valid index file; it is truncated or damaged (safetensors: "
                             f"{_line(e)}); rebuild it with 'deepmetric index build'") from None
    except FaissMissingError as e:
        raise FaissMissingError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as e:
        # _Bad (our checks), SearchIndexError (a bad parameter), faiss's RuntimeError, numpy's errors
        raise IndexFileError(f"{path}: {'' if isinstance(e, _Bad) else 'not a valid index: '}{_line(e)}") from None


def few(values: Sequence[Any], most: int = 8) -> str:
    """The first ``most`` values, comma-separated, and how many more there are."""
    shown = ", ".join(str(v) for v in list(values)[:most])
    return shown + (f", ... ({len(values) - most} more)" if len(values) > most else "")


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


def _parse_header(meta: Dict[str, str], backends: Collection[str]) -> Dict[str, Any]:
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
    if _field(h, "backend", str) not in backends:
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
    h.setdefault("changes", 0)
    _field(h, "changes", int)
    h.setdefault("slots", h["count"])
    _field(h, "slots", int, h["count"], 1 << 40)
    if "lineage" in h and (not isinstance(h["lineage"], str) or not 0 < len(h["lineage"]) <= 64
                           or not (h["lineage"].isascii() and h["lineage"].isalnum())):
        raise _Bad("header field 'lineage' must be 1 to 64 letters and digits")
    h.setdefault("lineage", f"file{_crc_text(text):08x}")  # older files: stable for the file's content
    return h


def read_header(path: Path, backends: Collection[str]) -> Dict[str, Any]:
    """The checked header of the index file at ``path`` (no array is read)."""
    return read(path, lambda h, read_arrays: h, backends)


def expected_arrays(h: Dict[str, Any], backend: Any) -> Dict[str, Spec]:
    """The arrays a file of header ``h`` must hold: the index's (module docstring) and ``backend``'s."""
    n = h["count"]
    classes = 0 if h["class_count"] is None else h["class_count"]
    out = {"ids": ("I64", (n,)), "labels": ("I64", (n,)), "path_offsets": ("I64", (n + 1,)), "path_bytes": ("U8", None),
           "class_offsets": ("I64", (classes + 1,)), "class_bytes": ("U8", None)}
    if h["mode"] == "centroids":
        out.update(counts=("I64", (n,)), centroid_sums=("F32", (n, h["dim"])))
    return {**out, **backend.expected(n, h["slots"])}


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
        raise _Bad(f"its arrays {few(sorted(names))} are not the {h['backend']} backend's "
                   f"{few(sorted(expected))}, or not those of its checksum table")
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
