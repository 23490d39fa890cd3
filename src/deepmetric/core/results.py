"""Typed results handed from the evaluator to reports and files: no dictionaries to guess from.

- :class:`RetrievalResults`: each query's top-k gallery items, their distances and relevance (the
  ranking itself, as OML's ``RetrievalResults`` keeps it), from
  :func:`deepmetric.evaluation.retrieval_results`;
- :class:`PairScores`: a verification protocol's pairs, each with its distance and truth;
- :class:`EvalResult`: one evaluation: the metrics, the embedding sets and, by protocol, the top
  neighbours (retrieval, re-ID) or the pair scores (verification).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Literal, Optional, Sequence

import numpy as np

from .embeddings import EmbeddingSet

Protocol = Literal["retrieval", "reid", "verification"]


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


@dataclass
class PairScores:
    """Verification pairs: ``distances (P,) float`` (lower = more alike) and ``is_same (P,) bool``."""

    distances: np.ndarray
    is_same: np.ndarray


@dataclass
class EvalResult:
    """One evaluation (:class:`deepmetric.engine.evaluator.Evaluator`): ``metrics`` (floats and counts
    by name), the ``query`` and ``gallery`` embeddings (``gallery`` None: leave-one-out; for
    verification ``query`` holds every pair image), and what the report draws: ``neighbours``, each
    query's top 5 (retrieval and re-ID, when asked for), or ``pairs`` (verification)."""

    metrics: Dict[str, Any]
    query: Optional[EmbeddingSet] = None
    gallery: Optional[EmbeddingSet] = None
    protocol: Protocol = "retrieval"
    neighbours: Optional[RetrievalResults] = None
    pairs: Optional[PairScores] = None
