"""Embeddings at scale: a folder of Parquet chunk files and a manifest, as ``torchrun -m deepmetric embed``
writes them, and the reader that checks and streams them back.

Layout of ``deepmetric embed --output DIR/``::

    DIR/part-RRRRR-CCCCCC.parquet   chunk C of the input list, embedded by rank R
    DIR/manifest.json               written by rank 0 (atomically) once every chunk is there

The input list (a folder's images sorted, or a list file in its order) is cut into chunks of
``chunk_size`` images; chunk ``i`` is embedded by rank ``i % world_size``, in the batches one process
would use, so the union of the chunks in chunk order is bit for bit the single-process output. Every
chunk file is written atomically (temporary name, fsync, rename): a file that exists is whole. A rerun
of the same command (any number of processes) skips each chunk whose file exists with matching
metadata and embeds only the others.

Columns: ``vector`` fixed_size_list<float32 | float16>[D], ``label`` int64 (-1 unlabelled), ``path``
string, ``class_name`` string ("" unlabelled). The Parquet key-value metadata ``deepmetric`` is JSON:
the run's identity (format, inputs digest, count, chunk size, model fingerprint, dim, dtype,
normalisation), the writer (source, runtime, deepmetric version, rank, world size) and the chunk
(``chunk``, ``start``, ``rows``). ``manifest.json`` repeats the identity and lists the chunks in order
(file, start, rows) with the class names. Spark, DuckDB, Ray and the vector databases' bulk inserts
read the chunk files directly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import UserError
from ..core.files import atomic_write
from .blocks import BLOCK_ROWS, DTYPES, Block, Embedder, EmbeddingsFileError, InputList
from .index_file import StringTable

log = logging.getLogger("deepmetric")

FORMAT = "deepmetric-embedding-shards"
VERSION = 1
MANIFEST = "manifest.json"
META_KEY = b"deepmetric"
#: what makes a chunk file one of this run's: a file that differs in any is embedded again
IDENTITY = ("format", "version", "inputs_sha256", "count", "chunk_size", "model", "dim", "dtype", "l2_normalized")
_PART = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")


def require_pyarrow() -> Tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a one-line error saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError("Parquet embeddings need pyarrow, which is not installed: pip install 'deepmetric[scale]'") \
            from None
    return pyarrow, pyarrow.parquet


def chunk_file(rank: int, chunk: int) -> str:
    return f"part-{rank:05d}-{chunk:06d}.parquet"


def inputs_digest(inputs: InputList) -> str:
    """SHA-256 of the input list (paths, labels, class names), hashed piece by piece (no giant string)."""
    h = hashlib.sha256()
    for p in inputs.paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    h.update(np.asarray(inputs.labels, "<i8").tobytes())
    h.update(json.dumps(list(inputs.class_names)).encode())
    return h.hexdigest()


def chunk_spans(count: int, chunk_size: int) -> List[Tuple[int, int, int]]:
    """``(chunk, start, stop)`` of every chunk of ``count`` inputs."""
    return [(i, s, min(s + chunk_size, count)) for i, s in enumerate(range(0, count, chunk_size))]


def run_identity(predictor: Embedder, inputs: InputList, chunk_size: int, dtype: str) -> Dict[str, Any]:
    """What every chunk of this run carries, and what a chunk must match to be kept on a rerun."""
    from ..core import __version__

    return {"format": FORMAT, "version": VERSION, "inputs_sha256": inputs_digest(inputs),
            "count": len(inputs.paths), "chunk_size": int(chunk_size),
            "model": predictor.fingerprint or predictor.source, "dim": predictor.embedding_dim, "dtype": dtype,
            "l2_normalized": predictor.normalized, "source": predictor.source, "runtime": predictor.runtime,
            "deepmetric_version": __version__}


# -- writing -------------------------------------------------------------------------------------------

def write_chunk(path: Path, vectors: np.ndarray, labels: np.ndarray, paths: Sequence[str],
                class_names: Sequence[str], meta: Dict[str, Any]) -> None:
    """One chunk file: ``vectors (n, D)`` float32/float16, ``labels (n,)`` int64, ``paths``, and each row's
    class name (``class_names[label]``), with ``meta`` as the file's metadata; written atomically."""
    pa, pq = require_pyarrow()
    n, dim = vectors.shape
    names = np.asarray(list(class_names) + [""], dtype=object)  # a label without a name reads the last entry
    labels = np.asarray(labels, np.int64)
    named = np.where((labels >= 0) & (labels < len(names) - 1), labels, len(names) - 1)
    table = pa.table({
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vectors).reshape(-1)), dim),
        "label": pa.array(labels, pa.int64()),
        "path": pa.array(list(paths), pa.string()),
        "class_name": pa.array(names[named], pa.string()),
    }).replace_schema_metadata({META_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: pq.write_table(table, f, compression="snappy", use_dictionary=["class_name"],
                                                row_group_size=max(n, 1)))


def read_meta(path: Path) -> Optional[Dict[str, Any]]:
    """The ``deepmetric`` metadata of a chunk file (its footer only), or None if it has none or is unreadable."""
    _, pq = require_pyarrow()
    try:
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def _chunk_files(folder: Path) -> Dict[int, List[Path]]:
    """The chunk files in ``folder`` by chunk number (a rerun with another world size names them anew)."""
    out: Dict[int, List[Path]] = {}
    for entry in os.scandir(folder) if folder.is_dir() else ():
        m = _PART.match(entry.name)
        if m:
            out.setdefault(int(m.group(2)), []).append(folder / entry.name)
    return out


def _matches(meta: Optional[Dict[str, Any]], identity: Dict[str, Any], span: Tuple[int, int, int]) -> bool:
    return meta is not None and all(meta.get(k) == identity[k] for k in IDENTITY) and \
        (meta.get("chunk"), meta.get("start"), meta.get("rows")) == (span[0], span[1], span[2] - span[1])


@dataclass
class ShardRun:
    """What one rank did: the chunks it embedded and those it found done."""

    rank: int
    embedded: List[int]
    skipped: List[int]


def embed_shards(predictor: Embedder, inputs: InputList, folder: Path, *, rank: int = 0, world_size: int = 1,
                 chunk_size: int = 65536, batch_size: int = 64, dtype: str = "float32", num_workers: int = 0,
                 progress: bool = False) -> ShardRun:
    """Embed this rank's chunks of ``inputs`` (chunk ``i`` when ``i % world_size == rank``) into ``folder``,
    skipping those already written with matching metadata. The manifest is :func:`write_manifest`'s job,
    once every rank is done."""
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    if chunk_size < 1 or batch_size < 1:
        raise UserError("chunk size and batch size must be >= 1")
    identity = run_identity(predictor, inputs, chunk_size, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    existing = _chunk_files(folder)
    mine = [span for span in chunk_spans(len(inputs.paths), chunk_size) if span[0] % world_size == rank]
    done = {span[0] for span in mine if any(_matches(read_meta(p), identity, span) for p in existing.get(span[0], []))}
    if done:
        log.info("resuming %s: %d of this process's %d chunks already embedded", folder, len(done), len(mine))
    run = ShardRun(rank, [], sorted(done))
    todo = [span for span in mine if span[0] not in done]
    with tqdm(total=sum(e - s for _, s, e in todo), desc=f"embed (rank {rank})" if world_size > 1 else "embed",
              unit="img", disable=not progress) as bar:
        for i, s, e in todo:
            got = []
            for emb in predictor.iter_embeddings(inputs.paths[s:e], batch_size, num_workers):
                got.append(emb)
                bar.update(len(emb))
            meta = {**identity, "chunk": i, "start": s, "rows": e - s, "rank": rank, "world_size": world_size}
            target = folder / chunk_file(rank, i)
            write_chunk(target, np.concatenate(got).astype(DTYPES[dtype]), inputs.labels[s:e], inputs.paths[s:e],
                        inputs.class_names, meta)
            for stale in existing.get(i, []):  # the same chunk from an earlier run of other settings
                if stale != target:
                    stale.unlink(missing_ok=True)
            run.embedded.append(i)
    return run


def write_manifest(folder: Path, predictor: Embedder, inputs: InputList, chunk_size: int, dtype: str) -> Path:
    """``folder/manifest.json`` (atomically), once every chunk is written: the run's identity, the class
    names and the chunks in order. Chunk files of no chunk of this run are removed."""
    identity = run_identity(predictor, inputs, chunk_size, dtype)
    existing = _chunk_files(folder)
    chunks = []
    for span in chunk_spans(len(inputs.paths), chunk_size):
        found = [p for p in existing.pop(span[0], []) if _matches(read_meta(p), identity, span)]
        if not found:
            raise UserError(f"{folder}: chunk {span[0]} is missing or from other settings after every process "
                            "finished; rerun the same command to embed it")
        chunks.append({"file": found[0].name, "start": span[1], "rows": span[2] - span[1]})
    for paths in existing.values():  # chunks past the end of this run's inputs
        for p in paths:
            p.unlink(missing_ok=True)
    return _manifest(folder, identity, inputs.class_names, chunks)


def _manifest(folder: Path, identity: Dict[str, Any], class_names: Sequence[str], chunks: List[Dict[str, Any]]) -> Path:
    manifest = {**identity, "class_names": list(class_names), "chunks": chunks}
    return atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1))


def write_folder(folder: str | os.PathLike, blocks: Iterable[Tuple[np.ndarray, np.ndarray, Sequence[str]]], *,
                 model: str, dtype: str = "float32", class_names: Sequence[str] = (), l2_normalized: bool = False,
                 source: str = "") -> Path:
    """A folder as ``embed`` writes it from embeddings made elsewhere (another pipeline, a synthetic
    benchmark): one chunk file per block ``(vectors (n, D), labels (n,) int64, paths)``, then the
    manifest; ``model`` names the model (its fingerprint). Returns the manifest's path."""
    from ..core import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity: Dict[str, Any] = {"format": FORMAT, "version": VERSION, "inputs_sha256": None, "count": None,
                                "chunk_size": None, "model": model, "dim": None, "dtype": dtype,
                                "l2_normalized": l2_normalized, "source": source, "runtime": None,
                                "deepmetric_version": __version__}
    digest, chunks, start = hashlib.sha256(), [], 0
    for i, (vectors, labels, paths) in enumerate(blocks):
        identity["dim"] = int(vectors.shape[1])
        name = chunk_file(0, i)
        write_chunk(folder / name, np.asarray(vectors).astype(DTYPES[dtype]), labels, paths, class_names,
                    {**identity, "chunk": i, "start": start, "rows": len(vectors)})
        for p in paths:
            digest.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
        digest.update(np.asarray(labels, "<i8").tobytes())
        chunks.append({"file": name, "start": start, "rows": len(vectors)})
        start += len(vectors)
    identity.update(count=start, inputs_sha256=digest.hexdigest())
    return _manifest(folder, identity, class_names, chunks)


def remove_stale_manifest(folder: Path, predictor: Embedder, inputs: InputList, chunk_size: int, dtype: str) -> None:
    """Remove a manifest of another run (other inputs, model or settings) before this run writes chunks,
    so a reader never takes the new chunks for the old run's."""
    path = folder / MANIFEST
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    identity = run_identity(predictor, inputs, chunk_size, dtype)
    if path.exists() and not (isinstance(old, dict) and all(old.get(k) == identity[k] for k in IDENTITY)):
        log.info("%s: a manifest of another run; it is replaced when this run finishes", path)
        path.unlink()


# -- reading -------------------------------------------------------------------------------------------

def _error(message: str) -> UserError:
    return EmbeddingsFileError(message)


@dataclass(frozen=True)
class Chunk:
    path: Path
    start: int
    rows: int


class ShardSet:
    """A checked folder of chunk files: ``count`` vectors of ``dim`` (stored as ``dtype``), read back chunk
    by chunk (:meth:`blocks`) or whole (:meth:`read_all`). Opening reads only the manifest and each
    chunk's footer, and refuses (one line naming the file) a missing chunk, a chunk of another model, of
    another dimension or dtype, or a row count that differs from the manifest's."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            parts = len(_chunk_files(self.path))
            raise _error(f"{self.path}: no {MANIFEST}" + (
                f" beside its {parts} chunk files: the embed did not finish; rerun the same command to complete it"
                if parts else "; expected a folder written by 'deepmetric embed --output DIR/'"))
        try:
            m = json.loads(manifest.read_text())
            if not isinstance(m, dict) or m.get("format") != FORMAT:
                raise ValueError("not a deepmetric manifest")
            self.count, self.dim, self.dtype = int(m["count"]), int(m["dim"]), str(m["dtype"])
            self.chunks = [Chunk(self.path / str(c["file"]), int(c["start"]), int(c["rows"])) for c in m["chunks"]]
            self.class_names = [str(c) for c in m.get("class_names", [])]
        except (ValueError, KeyError, TypeError) as e:
            raise _error(f"{manifest}: not a readable embeddings manifest ({e})".splitlines()[0]) from None
        self.manifest = m
        self.meta = {k: m.get(k) for k in ("source", "model", "runtime", "dim", "dtype", "l2_normalized", "count",
                                           "deepmetric_version")}
        self._check()

    def _check(self) -> None:
        _, pq = require_pyarrow()
        missing = [c.path.name for c in self.chunks if not c.path.is_file()]
        if missing:
            raise _error(f"{self.path}/{MANIFEST} lists {missing[0]}, which is missing ({len(missing)} of "
                         f"{len(self.chunks)} chunks missing); rerun the embed command to write them again")
        if sum(c.rows for c in self.chunks) != self.count or \
                any(c.start != sum(d.rows for d in self.chunks[:i]) for i, c in enumerate(self.chunks)):
            raise _error(f"{self.path}/{MANIFEST}: its chunks' rows do not add up to its count {self.count}")
        agreeing = ""  # a chunk of the manifest's model, named beside it when another chunk is not
        for c in self.chunks:
            try:
                footer = pq.read_metadata(c.path)
            except (OSError, ValueError) as e:
                raise _error(f"{c.path}: not a readable Parquet file ({e})".splitlines()[0]) from None
            meta = json.loads((footer.metadata or {}).get(META_KEY) or "{}")
            dim, dtype = _vector_type(footer.schema.to_arrow_schema(), c.path)
            if meta.get("model") != self.manifest.get("model"):
                raise _error(f"{c.path}: embedded by model {meta.get('model')}, but the manifest"
                             f"{f' (and {agreeing})' if agreeing else ''} by model {self.manifest.get('model')}; "
                             "their vectors are not comparable: embed those images again with the same model")
            agreeing = agreeing or c.path.name
            if dim != self.dim:
                raise _error(f"{c.path}: {dim}-d vectors, the manifest says {self.dim}-d (a dimension mismatch); "
                             "embed those images again with the same model")
            if dtype != self.dtype:
                raise _error(f"{c.path}: {dtype} vectors among {self.dtype} ones (mixed dtypes across chunks); "
                             f"embed those images again with --dtype {self.dtype}")
            if footer.num_rows != c.rows:
                raise _error(f"{c.path}: {footer.num_rows} rows, the manifest says {c.rows}; rerun the embed command")

    def __len__(self) -> int:
        return self.count

    def blocks(self, rows: int = BLOCK_ROWS, vectors_only: bool = False) -> Iterator[Block]:
        """The vectors as ``(n, D) float32`` blocks of at most ``rows``, in manifest order, with their labels
        and paths (a :class:`StringTable`, no Python string per row) unless ``vectors_only``."""
        pa, pq = require_pyarrow()
        columns = ["vector"] if vectors_only else ["vector", "label", "path"]
        for c in self.chunks:
            for batch in pq.ParquetFile(c.path).iter_batches(batch_size=rows, columns=columns, use_threads=False):
                vec = batch.column("vector")
                flat = vec.values.to_numpy(zero_copy_only=False)[vec.offset * self.dim:(vec.offset + len(vec)) * self.dim]
                vectors = flat.reshape(len(vec), self.dim).astype(np.float32)  # a copy: Arrow's buffer is freed
                if vectors_only:
                    yield Block(vectors, None, None)
                else:
                    yield Block(vectors, batch.column("label").to_numpy().astype(np.int64),
                                string_table(batch.column("path")))
                del batch, vec, flat
            pa.default_memory_pool().release_unused()  # else its allocator keeps each chunk's pages a while

    def read_all(self) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        """``(vectors (N, D) float32, labels (N,) int64, paths)``: everything in memory."""
        parts = list(self.blocks())
        if not parts:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64), []
        return (np.concatenate([b.vectors for b in parts]), np.concatenate([b.labels for b in parts]),
                [p or "" for b in parts for p in b.paths])


def _vector_type(schema: Any, path: Path) -> Tuple[int, str]:
    """``(dim, dtype)`` of a chunk's ``vector`` column, from its Arrow schema."""
    pa, _ = require_pyarrow()
    names = {pa.float32(): "float32", pa.float16(): "float16"}
    field = schema.field("vector") if "vector" in schema.names else None
    if field is None or not pa.types.is_fixed_size_list(field.type) or field.type.value_type not in names:
        raise _error(f"{path}: no 'vector' column of fixed-size float32 or float16 lists; not a chunk "
                     "written by 'deepmetric embed'")
    return int(field.type.list_size), names[field.type.value_type]


def string_table(column: Any) -> StringTable:
    """An Arrow string array as a :class:`StringTable` (its offsets and bytes, no Python string per row;
    nulls read as empty, i.e. None)."""
    pa, _ = require_pyarrow()
    column = column.cast(pa.large_string()) if column.type != pa.large_string() else column
    _, offsets_buf, data = column.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[column.offset:column.offset + len(column) + 1]
    blob = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    return StringTable(blob.copy(), offsets - offsets[0])
