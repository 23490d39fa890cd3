"""Retrieval results as data: each query's top-k gallery items, their distances and relevance.

The metrics summarise a ranking; :class:`~deepmetric.core.results.RetrievalResults` keeps it, so a failure can be looked at
item by item (as OML's ``RetrievalResults`` does). ``deepmetric eval RUN --neighbours K`` writes
them as ``neighbours.jsonl``, one line per query.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..core.results import RetrievalResults
from .neighbors import topk_neighbors

__all__ = ["RetrievalResults", "retrieval_results"]


def retrieval_results(query, query_labels, gallery=None, gallery_labels=None, k: int = 10,
                      distance: str = "cosine", query_camids=None, gallery_camids=None,
                      chunk_size: Optional[int] = None) -> RetrievalResults:
    """The top-``k`` of each query, with the same ranking (ties: lower index first) as the metrics.

    ``gallery=None`` is leave-one-out on the query set. With camera ids on both sides, gallery items
    of the query's identity and camera are flagged ``ignored`` (the re-ID protocol's junk).

    >>> r = retrieval_results(np.array([[0.0], [0.1], [1.0]]), [0, 0, 1], k=1, distance="euclidean")
    >>> r.indices.ravel().tolist(), r.relevant.ravel().tolist()
    ([1, 0, 1], [True, True, False])
    """
    ql = np.asarray(query_labels)
    gl = ql if gallery is None else np.asarray(gallery_labels)
    dist, idx = topk_neighbors(query, gallery, k=k, distance=distance, chunk_size=chunk_size)
    idx_np = idx.cpu().numpy()
    relevant = gl[idx_np] == ql[:, None]
    ignored = np.zeros_like(relevant)
    if query_camids is not None and (gallery is None or gallery_camids is not None):
        qc = np.asarray(query_camids)
        gc = qc if gallery is None else np.asarray(gallery_camids)
        ignored = relevant & (gc[idx_np] == qc[:, None])
        relevant = relevant & ~ignored
    return RetrievalResults(idx_np, dist.to(torch.float32).cpu().numpy(), relevant, ignored)
