"""What the embedding writers and readers share (:mod:`deepmetric.inference.embeddings_io` for
``features.npz``, :mod:`deepmetric.inference.shards` for Parquet chunks): the inputs to embed
(:class:`InputList`), what a writer needs of a model (:class:`Embedder`), the stored dtypes, the error
for a bad embeddings file, and :class:`Block`, the unit a streaming reader yields.

A streaming reader has ``count``, ``dim``, ``dtype``, ``meta`` (the writer's: model fingerprint, source,
dim, dtype, normalisation, version), ``class_names`` and ``blocks(rows, vectors_only)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Protocol, Sequence

import numpy as np

from ..core.errors import UserError
from .index_file import StringTable

#: the vector dtypes embeddings are stored in (read back as float32)
DTYPES = {"float32": np.float32, "float16": np.float16}
#: rows per block of a streaming read by default: 32 MB of 128-d float32 vectors
BLOCK_ROWS = 65536


class EmbeddingsFileError(UserError):
    """A features file or Parquet folder that is missing, foreign, damaged or inconsistent; the message
    names the file."""


@dataclass
class InputList:
    """Image ``paths`` with ``labels`` ((N,) int64, -1 unlabelled) and the ``class_names`` labels index."""

    paths: List[str]
    labels: np.ndarray
    class_names: List[str]


class Embedder(Protocol):
    """What a writer needs of a model (:class:`~deepmetric.inference.predictor.Predictor` is one)."""

    fingerprint: Optional[str]
    source: str
    runtime: str

    @property
    def embedding_dim(self) -> int: ...

    @property
    def normalized(self) -> bool: ...

    def iter_embeddings(self, paths: Sequence[str], batch_size: int = 64, num_workers: int = 0) -> Iterator[np.ndarray]:
        ...


@dataclass(frozen=True)
class Block:
    """Consecutive rows of a collection: ``vectors (n, D) float32``, ``labels (n,) int64`` and ``paths``
    (None where only the vectors were read)."""

    vectors: np.ndarray
    labels: Optional[np.ndarray]
    paths: Optional[StringTable]


def sample_vectors(source: Any, n: int, rows: int = BLOCK_ROWS) -> np.ndarray:
    """``(min(n, count), D) float32``: rows drawn evenly across the collection (row ``floor(i count / n)``,
    so every chunk gives its share; all rows in order when ``n >= count``), read a block at a time."""
    count = source.count
    want = np.arange(count, dtype=np.int64) if n >= count else (np.arange(n, dtype=np.int64) * count) // n
    out = np.empty((len(want), source.dim), np.float32)
    start = 0
    for block in source.blocks(rows, vectors_only=True):
        stop = start + len(block.vectors)
        lo, hi = np.searchsorted(want, [start, stop])
        out[lo:hi] = block.vectors[want[lo:hi] - start]
        start = stop
    return out
