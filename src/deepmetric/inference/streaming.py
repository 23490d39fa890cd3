"""``deepmetric index build`` over a collection larger than memory.

The embeddings are read a block at a time (:func:`~deepmetric.inference.embeddings_io.open_embeddings`:
a folder of Parquet chunks, or an ``.npz`` read in row slices), so the build holds one block of vectors
plus what the index itself keeps:

- ``faiss-ivf`` / ``faiss-ivfpq``: the coarse centroids (and the PQ codebooks) are trained on
  ``train_size`` vectors drawn evenly across the collection (a first pass over the vectors), then every
  block is added (a second pass). IVF-PQ keeps ``m`` bytes of code and 8 of row number per vector; with
  on-disk lists those go to a sidecar file as well (:mod:`deepmetric.inference.ivf_ondisk`), so the
  build holds neither. ``on_disk="auto"`` picks them when the lists would take more than
  :data:`ONDISK_FRACTION` of this machine's memory. With ``train_size >= count`` the build trains on
  every vector in order, as an in-memory build does, and gives the same index.
- ``exact``, ``faiss-flat``: the blocks are added in turn (these keep every vector anyway).
- ``faiss-hnsw`` and centroid mode: the collection is read whole, as before: an HNSW graph built in one
  add differs from one built block by block (FAISS inserts a batch level by level), and a centroid
  needs all its label's members. Both keep every vector (or centroid sum) in memory anyway.

The per-item metadata stays columnar: labels as int64 arrays, paths as one UTF-8 blob with offsets
(:class:`~deepmetric.inference.index_file.StringTable`), joined once (:meth:`SearchIndex.add_stream`),
never a Python object per item.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from .backends import SearchIndexError
from .blocks import BLOCK_ROWS, sample_vectors
from .index import SearchIndex
from .index_file import StringTable
from .vectors import canonical_metric, check_finite, l2_normalize

log = logging.getLogger("deepmetric")

#: on_disk="auto" puts IVF-PQ lists on disk when they would take more than this share of physical memory
ONDISK_FRACTION = 0.25
#: vectors the IVF quantisers train on by default (drawn evenly across the collection)
TRAIN_SIZE = 100_000
ON_DISK_CHOICES = ("auto", "yes", "no")
#: backends built from the whole collection in one add (the module docstring says why)
WHOLE = ("faiss-hnsw",)


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def build_index(source: Any, output: Path, *, backend: str = "exact", metric: str = "cosine",
                centroids: bool = False, params: Optional[Dict[str, Any]] = None, train_size: int = TRAIN_SIZE,
                on_disk: str = "auto", class_names: Optional[Sequence[str]] = None,
                source_info: Optional[Dict[str, Any]] = None, rows: int = BLOCK_ROWS,
                progress_every_s: float = 10.0) -> SearchIndex:
    """An index over the streaming ``source`` (:func:`~deepmetric.inference.embeddings_io.open_embeddings`),
    built as the module docstring says. ``output`` is where the index file will be saved (:func:`save`):
    on-disk lists are written beside it before this returns."""
    if on_disk not in ON_DISK_CHOICES:
        raise SearchIndexError(f"on_disk must be one of {', '.join(ON_DISK_CHOICES)}, got {on_disk!r}")
    if train_size < 1:
        raise SearchIndexError(f"--train-size must be >= 1, got {train_size}")
    if on_disk == "yes" and backend != "faiss-ivfpq":
        raise SearchIndexError(f"--on-disk lists are for --backend faiss-ivfpq, not {backend}")
    if centroids and on_disk == "yes":
        raise SearchIndexError("--on-disk lists are for an index of items, not --centroids")
    if centroids or backend in WHOLE:
        return _whole(source, backend, metric, centroids, params or {}, class_names, source_info, rows)
    index = SearchIndex(source.dim, metric, backend, class_names=class_names, source=source_info, **(params or {}))
    if hasattr(index.backend, "train") and source.count:
        sample = sample_vectors(source, train_size, rows)
        check_finite(sample, f"{getattr(source, 'path', 'embeddings')}: training sample")
        index.backend.train(l2_normalize(sample) if index.metric == "cosine" else sample, source.count)
        del sample
    disk = _choose_on_disk(on_disk, index, source.count)
    if disk:
        index.backend.start_on_disk(output)
    try:
        index.add_stream(_batches(source, rows, progress_every_s))
        if disk:
            sidecar = index.backend.finish_on_disk()
            log.info("index build: on-disk lists in %s (%.1f GB)", sidecar, sidecar.stat().st_size / 1e9)
    except BaseException:
        if disk:
            index.backend.abort_on_disk()
        raise
    return index


def _choose_on_disk(choice: str, index: SearchIndex, count: int) -> bool:
    if choice == "no" or index.backend_name != "faiss-ivfpq" or index.backend.index is None:
        return False
    if choice == "yes":
        return True
    if index.backend.params["refine"]:  # refine keeps every vector in memory: on-disk lists would not help
        return False
    need, ram = count * (index.backend.code_size + 8), physical_memory()
    if ram and need > ONDISK_FRACTION * ram:
        log.info("index build: the inverted lists take %.1f GB, more than %d%% of this machine's %.1f GB of "
                 "memory: they go to disk beside the index (--on-disk no keeps them in memory)",
                 need / 1e9, ONDISK_FRACTION * 100, ram / 1e9)
        return True
    return False


def _batches(source: Any, rows: int, every_s: float) -> Iterator[Tuple[np.ndarray, np.ndarray, StringTable]]:
    """The source's blocks as ``add_stream`` takes them, with a log line every ``every_s`` seconds."""
    done, start = 0, time.monotonic()
    last = start
    for block in source.blocks(rows):
        yield block.vectors, block.labels, block.paths
        done += len(block.vectors)
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            log.info("index build: %d of %d vectors added (%.0f s)", done, source.count, now - start)


def _whole(source: Any, backend: str, metric: str, centroids: bool, params: Dict[str, Any],
           class_names: Optional[Sequence[str]], source_info: Optional[Dict[str, Any]], rows: int) -> SearchIndex:
    """The collection read whole, then built in one add, as before."""
    vectors, labels, paths = [], [], []
    for block in source.blocks(rows):
        vectors.append(block.vectors)
        labels.append(block.labels)
        paths.extend(block.paths)
    index = SearchIndex(source.dim, canonical_metric(metric), backend, mode="centroids" if centroids else "items",
                        class_names=class_names, source=source_info, **params)
    index.add(np.concatenate(vectors) if vectors else np.zeros((0, source.dim), np.float32),
              np.concatenate(labels) if labels else None, paths)
    return index


def save(index: SearchIndex, output: Path) -> Path:
    """Save a built index to ``output`` (atomically), then remove the on-disk lists of an earlier build there."""
    from .ivf_ondisk import remove_others

    index.save(output)
    sidecar = getattr(index.backend, "sidecar", None)
    remove_others(Path(output), keep=sidecar.name if sidecar is not None else "")
    return Path(output)
