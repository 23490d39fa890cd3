"""Retrieval results as data: each query's top-k gallery items, their distances and relevance.

The metrics summarise a ranking; :class:`RetrievalResults` keeps it, so a failure can be looked at
item by item (as OML's ``RetrievalResults`` does). ``deepmetric eval RUN --neighbours K`` writes
them as ``neighbours.jsonl``, one line per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .neighbors import topk_neighbors


@dataclass
class RetrievalResults:
    """Top-``k`` of every query.

    ``indices (Q, k) int64`` gallery indices (query indices in leave-one-out, the query itself left
    out), ``distances (Q, k) float32`` ascending, ``relevant (Q, k) bool`` (same label), and
    ``ignored (Q, k) bool``: items the re-ID protocol removes (same identity and same camera), which
    are listed but neither relevant nor wrong.
    """

    indices: np.ndarray
    distances: np.ndarray
    relevant: np.ndarray
    ignored: np.ndarray

    def records(self, query_labels: np.ndarray, gallery_labels: np.ndarray,
                query_paths: Optional[Sequence[str]] = None,
                gallery_paths: Optional[Sequence[str]] = None) -> Iterator[dict]:
        """One JSON-ready dict per query: ``query``, ``label``, (``path``), ``neighbours`` list of
        ``{index, label, distance, relevant, ignored, (path)}``."""
        for qi in range(self.indices.shape[0]):
            rec = {"query": qi, "label": _plain(query_labels[qi])}
            if query_paths is not None:
                rec["path"] = query_paths[qi]
            hits = []
            for j, gi in enumerate(self.indices[qi].tolist()):
                hit = {"index": gi, "label": _plain(gallery_labels[gi]), "distance": float(self.distances[qi, j]),
                       "relevant": bool(self.relevant[qi, j]), "ignored": bool(self.ignored[qi, j])}
                if gallery_paths is not None:
                    hit["path"] = gallery_paths[gi]
                hits.append(hit)
            rec["neighbours"] = hits
            yield rec


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


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
