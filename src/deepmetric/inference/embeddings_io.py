"""Embeddings on disk: the ``features.npz`` of ``deepmetric embed`` (written resumably, read whole) and the
streaming readers of ``index build`` (:func:`open_embeddings`: an ``.npz`` read in slices, or a folder of
Parquet chunks, :mod:`deepmetric.inference.shards`).

``features.npz`` (read back with :func:`load_embeddings`)::

    vectors      (N, D) float32 or float16
    labels       (N,) int64, -1 for unlabelled
    paths        (N,) str
    class_names  (C,) str, the name of label i (empty if labels are not from folders)
    meta         0-d str: JSON (source checkpoint, model fingerprint, dim, dtype, normalised, version)

:func:`write_embeddings` writes ``chunk_size`` images at a time into ``<output>.parts/`` next to a
manifest; rerun with the same inputs and model, it skips finished chunks, then streams them into
the ``.npz`` (written under a temporary name and renamed, so a half-written file never appears).

A streaming reader (:class:`NpzSource`, :class:`~deepmetric.inference.shards.ShardSet`) gives ``count``,
``dim``, ``meta``, ``class_names`` and :meth:`blocks`: ``(n, D) float32`` blocks with their labels and
paths, so memory holds one block, not the collection. An ``.npz`` as ``embed`` and ``numpy.savez``
write it (members stored uncompressed) is read in row slices straight from the file; a compressed one
is read whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List

import numpy as np

from ..core.errors import UserError
from ..core.files import atomic_write
from .blocks import BLOCK_ROWS, DTYPES, Block, Embedder, EmbeddingsFileError, InputList
from .index_file import StringTable
from .shards import ShardSet

if TYPE_CHECKING:
    from ..core.embeddings import EmbeddingSet

log = logging.getLogger("deepmetric")


# -- features.npz: writing ---------------------------------------------------------------------------

def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_embeddings(predictor: Embedder, inputs: InputList, output: str | os.PathLike, *, batch_size: int = 64,
                     dtype: str = "float32", chunk_size: int = 4096, num_workers: int = 0,
                     progress: bool = True) -> Path:
    """Embed ``inputs`` into ``output`` (``.npz``, layout in the module docstring), resumably.

    Chunks of ``chunk_size`` images go to ``<output>.parts/chunk_NNNNNN.npy``; ``manifest.json`` there
    records the inputs, model fingerprint, dtype and chunk size, and a rerun with the same four
    continues after the last finished chunk (anything else starts over, with a warning).
    """
    from tqdm.auto import tqdm

    from ..core import __version__

    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    if chunk_size < 1 or batch_size < 1:
        raise UserError("chunk size and batch size must be >= 1")
    output = Path(output)
    parts = output.with_name(output.name + ".parts")
    digest = hashlib.sha256(json.dumps([inputs.paths, inputs.labels.tolist()]).encode()).hexdigest()
    manifest = {"format": "deepmetric-embedding-parts", "version": 1, "inputs_sha256": digest,
                "count": len(inputs.paths), "chunk_size": int(chunk_size), "dtype": dtype,
                "model": predictor.fingerprint or predictor.source, "dim": predictor.embedding_dim}
    mpath = parts / "manifest.json"
    if parts.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, ValueError):
            old = None
        if old != manifest:
            log.warning("%s: partial embeddings from other inputs, model or settings; starting over", parts)
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not mpath.exists():
        atomic_write(mpath, json.dumps(manifest))
    n, np_dtype = len(inputs.paths), DTYPES[dtype]
    chunks = [(i, s, min(s + chunk_size, n)) for i, s in enumerate(range(0, n, chunk_size))]
    done = {i for i, s, e in chunks if (parts / f"chunk_{i:06d}.npy").is_file()}
    if done:
        log.info("resuming %s: %d of %d chunks already embedded", output, len(done), len(chunks))
    with tqdm(total=n, initial=sum(e - s for i, s, e in chunks if i in done), desc="embed", unit="img",
              disable=not progress) as bar:
        for i, s, e in chunks:
            if i in done:
                continue
            got = []
            for emb in predictor.iter_embeddings(inputs.paths[s:e], batch_size, num_workers):
                got.append(emb)
                bar.update(len(emb))
            atomic_write(parts / f"chunk_{i:06d}.npy", _npy_bytes(np.concatenate(got).astype(np_dtype)))
    meta = {"source": predictor.source, "model": predictor.fingerprint, "runtime": predictor.runtime,
            "dim": predictor.embedding_dim, "dtype": dtype, "l2_normalized": predictor.normalized,
            "count": n, "deepmetric_version": __version__}
    _assemble(output, [parts / f"chunk_{i:06d}.npy" for i, _, _ in chunks], inputs, meta, np_dtype,
              predictor.embedding_dim)
    shutil.rmtree(parts)
    return output


def _assemble(output: Path, chunk_files: List[Path], inputs: InputList, meta: Dict[str, Any],
              dtype: Any, dim: int) -> None:
    """Stream the chunks into one ``.npz`` (never all vectors in memory), written atomically."""
    def write(out) -> None:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("vectors.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": (len(inputs.paths), dim)}
                np.lib.format.write_array_header_2_0(f, header)
                for cf in chunk_files:
                    f.write(np.ascontiguousarray(np.load(cf), dtype=dtype).tobytes())
            zf.writestr("labels.npy", _npy_bytes(inputs.labels.astype(np.int64)))
            zf.writestr("paths.npy", _npy_bytes(np.asarray(inputs.paths, dtype=str)))
            zf.writestr("class_names.npy", _npy_bytes(np.asarray(inputs.class_names, dtype=str)))
            zf.writestr("meta.npy", _npy_bytes(np.asarray(json.dumps(meta))))

    atomic_write(output, write)


@dataclass
class EmbeddingsFile:
    """What :func:`load_embeddings` read: the :class:`EmbeddingSet`, label names and the writer's metadata."""

    embeddings: EmbeddingSet
    class_names: List[str]
    meta: Dict[str, Any]


def load_embeddings(path: str | os.PathLike) -> EmbeddingsFile:
    """Read a ``features.npz`` written by ``deepmetric embed``, or a folder of its Parquet chunks, whole
    (vectors come back as float32). For a collection larger than memory, stream it: :func:`open_embeddings`."""
    path = Path(path)
    if path.is_dir():
        from ..core.embeddings import EmbeddingSet

        shards = ShardSet(path)
        vectors, labels, paths = shards.read_all()
        return EmbeddingsFile(EmbeddingSet(vectors, labels, paths=paths), shards.class_names, shards.meta)
    if not path.is_file():
        raise EmbeddingsFileError(f"embeddings file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise EmbeddingsFileError(f"{path}: not an .npz embeddings file; write one with 'deepmetric embed'")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("vectors", "labels", "paths") if k not in z.files]
            if missing:
                raise EmbeddingsFileError(f"{path}: no {', '.join(missing)} array; write it with 'deepmetric embed'")
            vectors = z["vectors"].astype(np.float32)
            labels, paths = z["labels"], [str(p) for p in z["paths"]]
            names = [str(c) for c in z["class_names"]] if "class_names" in z.files else []
            meta = json.loads(str(z["meta"].reshape(-1)[0])) if "meta" in z.files else {}
        from ..core.embeddings import EmbeddingSet

        es = EmbeddingSet(vectors, labels, paths=paths)
    except EmbeddingsFileError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, ValueError, truncated data ...
        raise EmbeddingsFileError(f"{path}: not a readable embeddings file ({type(e).__name__}: {e})".splitlines()[0]) from None
    return EmbeddingsFile(es, names, meta)


# -- streaming readers ---------------------------------------------------------------------------------

class _Member:
    """One array of an ``.npz``, read in row slices straight from the file where it is stored uncompressed
    in C order (as ``embed`` and ``numpy.savez`` write it); read whole otherwise."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, name: str) -> None:
        info = zf.getinfo(name + ".npy")
        self.path, self.offset = path, None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                if version in ((1, 0), (2, 0)):
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read(f)
                    if not fortran and not dtype.hasobject:
                        self.shape, self.dtype, self.offset = tuple(shape), dtype, f.tell()
            if self.offset is not None and self.offset + self.nbytes > path.stat().st_size:
                raise EmbeddingsFileError(f"{path}: truncated ({name} needs {self.nbytes} bytes the file does not have)")
        if self.offset is None:
            with zf.open(info) as f:
                self._whole = np.lib.format.read_array(f, allow_pickle=False)
            self.shape, self.dtype = self._whole.shape, self._whole.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.offset is None:
            return self._whole[start:stop]
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), (stop - start) * row, self.offset + start * row)
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:]))


def _small(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    with zf.open(name + ".npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


class NpzSource:
    """A ``features.npz`` opened for streaming: ``count``, ``dim``, ``dtype``, ``meta``, ``class_names`` and
    :meth:`blocks`; only the blocks asked for are read (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path = Path(path)
        if not path.is_file():
            raise EmbeddingsFileError(f"embeddings file not found: {path}")
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                raise EmbeddingsFileError(f"{path}: not an .npz embeddings file or a folder of Parquet chunks; "
                                          "write one with 'deepmetric embed'")
        try:
            with zipfile.ZipFile(path) as zf:
                names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
                missing = [k for k in ("vectors", "labels", "paths") if k not in names]
                if missing:
                    raise EmbeddingsFileError(f"{path}: no {', '.join(missing)} array; write it with 'deepmetric embed'")
                self._vectors, self._labels, self._paths = (_Member(path, zf, k) for k in ("vectors", "labels", "paths"))
                self.class_names = [str(c) for c in _small(zf, "class_names")] if "class_names" in names else []
                self.meta = json.loads(str(_small(zf, "meta").reshape(-1)[0])) if "meta" in names else {}
        except EmbeddingsFileError:
            raise
        except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, ValueError, truncated data ...
            raise EmbeddingsFileError(f"{path}: not a readable embeddings file ({type(e).__name__}: {e})".splitlines()[0]) from None
        shape = self._vectors.shape
        if len(shape) != 2 or self._vectors.dtype.kind != "f" or self._labels.shape != shape[:1] or \
                self._paths.shape != shape[:1]:
            raise EmbeddingsFileError(f"{path}: vectors {list(shape)} {self._vectors.dtype}, labels "
                                      f"{list(self._labels.shape)} and paths {list(self._paths.shape)} do not "
                                      "describe (N, D) float vectors with N labels and paths")
        self.count, self.dim, self.dtype = int(shape[0]), int(shape[1]), str(self._vectors.dtype)

    def __len__(self) -> int:
        return self.count

    def blocks(self, rows: int = BLOCK_ROWS, vectors_only: bool = False) -> Iterator[Block]:
        """``(n, D) float32`` blocks of at most ``rows``, in order, with labels and paths unless ``vectors_only``."""
        for s in range(0, self.count, rows):
            e = min(s + rows, self.count)
            vectors = self._vectors.rows(s, e).astype(np.float32)
            if vectors_only:
                yield Block(vectors, None, None)
            else:
                yield Block(vectors, self._labels.rows(s, e).astype(np.int64),
                            StringTable.from_list(self._paths.rows(s, e).tolist()))


def open_embeddings(path: str | os.PathLike) -> Any:
    """A streaming reader of ``path``: a folder of Parquet chunks (:class:`~deepmetric.inference.shards.ShardSet`,
    checked as it opens) or an ``.npz`` (:class:`NpzSource`)."""
    if Path(path).is_dir():
        return ShardSet(path)
    return NpzSource(path)
