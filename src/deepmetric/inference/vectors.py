"""Vectors as a search index takes them: its metrics, ``(N, D)`` float32 matrices that must be finite,
L2 normalisation for cosine, and the per-label centroids of centroid mode (the index's module
docstring says how they are kept up to date)."""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ..core.distances import DISTANCES
from .backends import SearchIndexError

#: the :data:`~deepmetric.core.distances.DISTANCES` an index scores by; not plain ``euclidean``, which ranks
#: as squared does (and FAISS reports squared)
METRICS = tuple(d for d in DISTANCES if d != "euclidean")
METRIC_ALIASES = {"l2": "squared_euclidean"}


def canonical_metric(name: str) -> str:
    """``name`` as one of :data:`METRICS` (``l2`` is ``squared_euclidean``)."""
    name = METRIC_ALIASES.get(name, name)
    if name not in METRICS:
        raise SearchIndexError(f"unknown metric {name!r} (valid: {', '.join(METRICS)}; 'l2' = squared_euclidean)")
    return name


def as_matrix(x: Any, dim: Optional[int], what: str) -> np.ndarray:
    """``x`` (array, list or tensor) as a contiguous ``(N, dim)`` float32 matrix; one vector is one row."""
    torch = sys.modules.get("torch")  # a tensor exists only where torch is imported; never imported here
    if torch is not None and torch.is_tensor(x):
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise SearchIndexError(f"{what}: expected shape (N, {dim or 'D'}), got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_finite(x: np.ndarray, what: str, paths: Optional[Sequence[Optional[str]]] = None) -> None:
    """Refuse a matrix with a NaN or infinite value, naming its first such row (and that row's path)."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        path = f" ({paths[r]})" if paths is not None and paths[r] else ""
        more = f", and {int(bad.sum()) - 1} more rows" if bad.sum() > 1 else ""
        raise SearchIndexError(f"{what}: row {r}{path} holds NaN or infinite values{more}; every vector must "
                               "be finite (embed that image again, or leave it out)")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# -- centroids (Centroids-ReID, Wieczorek et al. 2021) ----------------------------------------------

def member_sums(x: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label of ``labels`` (all >= 0): ``(labels (C,), first member (C,), sums (C, D) float64, counts (C,))``."""
    uniq, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    sums = np.zeros((len(uniq), x.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, x)
    return uniq.astype(np.int64), first, sums, counts.astype(np.int64)


def centroid_vectors(sums: np.ndarray, counts: np.ndarray, metric: str) -> np.ndarray:
    cent = sums / counts[:, None]
    return (l2_normalize(cent) if metric == "cosine" else cent).astype(np.float32)


def labelled(labels: np.ndarray) -> np.ndarray:
    keep = np.flatnonzero(labels >= 0)
    if not len(keep):
        raise SearchIndexError("centroid mode needs labels: every item is unlabelled (-1); embed a folder "
                               "with one subfolder per class, or a list file with labels")
    return keep


def label_centroids(vectors: Any, labels: Sequence[int], paths: Optional[Sequence[Optional[str]]] = None,
                    metric: str = "cosine"):
    """One vector per label: ``(centroids (C, D) float32, labels (C,) int64, paths, counts (C,) int64)``.

    The mean of each label's vectors (members L2-normalised first and the mean re-normalised for
    ``cosine``); ``paths`` holds each label's first member (a picture to show for the centroid).
    Labels < 0 (unlabelled) are skipped.
    """
    metric = canonical_metric(metric)
    x = as_matrix(vectors, None, "centroids")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    idx = labelled(labels)
    uniq, first, sums, counts = member_sums(l2_normalize(x[idx]) if metric == "cosine" else x[idx], labels[idx])
    rep = None if paths is None else [paths[i] for i in idx[first]]
    return centroid_vectors(sums, counts, metric), uniq, rep, counts
