"""Embeddings as data: :class:`EmbeddingSet`, the object handed between embedding, evaluation and search."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class EmbeddingSet:
    """Vectors with what is known about each: ``vectors (N, D) float``, ``labels (N,) int64``,
    optional ``camids (N,) int64`` and ``paths`` (N strings).

    The hand-off object between embedding, evaluation and search: metrics read labels and camera ids
    from it, the search index keeps its paths and labels as hit metadata.
    """

    vectors: torch.Tensor
    labels: np.ndarray
    camids: Optional[np.ndarray] = None
    paths: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.vectors):
            self.vectors = torch.as_tensor(np.asarray(self.vectors))
        if self.vectors.ndim != 2:
            raise ValueError(f"EmbeddingSet.vectors must be (N, D), got shape {tuple(self.vectors.shape)}")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = self.vectors.shape[0]
        if len(self.labels) != n:
            raise ValueError(f"EmbeddingSet: {len(self.labels)} labels for {n} vectors")
        if self.camids is not None:
            self.camids = np.asarray(self.camids, dtype=np.int64).reshape(-1)
            if len(self.camids) != n:
                raise ValueError(f"EmbeddingSet: {len(self.camids)} camera ids for {n} vectors")
        if self.paths is not None:
            self.paths = [str(p) for p in self.paths]
            if len(self.paths) != n:
                raise ValueError(f"EmbeddingSet: {len(self.paths)} paths for {n} vectors")

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])
