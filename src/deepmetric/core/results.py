"""Typed results handed from the evaluator to reports and files: no dictionaries to guess from.

- :class:`RetrievalResults`: each query's top-k gallery items, their distances and relevance (the
  ranking itself, as OML's ``RetrievalResults`` keeps it), from
  :func:`deepmetric.evaluation.retrieval_results`; bound to its embedding sets, class names and images
  (:meth:`RetrievalResults.from_eval`) it draws itself (:meth:`~RetrievalResults.plot`,
  :meth:`~RetrievalResults.to_html`, and in a notebook);
- :class:`PairScores`: a verification protocol's pairs, each with its distance and truth;
- :class:`EvalResult`: one evaluation: the metrics, the embedding sets and, by protocol, the top
  neighbours (retrieval, re-ID) or the pair scores (verification).

The retrieval figure is drawn in :mod:`deepmetric.viz.retrieval` (matplotlib's object API, no
pyplot), which ``deepmetric`` registers in :mod:`.drawing`: ``plot()``, ``to_html()`` and the
notebook view call it, and the report draws the same grid, while core imports nothing above it.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Literal, Optional, Sequence

import numpy as np

from .drawing import drawer
from .embeddings import EmbeddingSet
from .files import atomic_write

Protocol = Literal["retrieval", "reid", "verification"]
#: ``load(i) -> image`` (PIL image, ``(H, W)`` / ``(H, W, C)`` / ``(C, H, W)`` array) of item ``i``
ImageLoader = Callable[[int], Any]
#: frame colours: relevant (same class), wrong (another class), ignored (re-ID junk: same identity and camera)
COLOURS = {"relevant": "#1a9850", "wrong": "#d73027", "ignored": "#888888"}
MARKS = {"relevant": "✓", "wrong": "✗", "ignored": "–"}


@dataclass
class RetrievalResults:
    """Top-``k`` of every query.

    ``indices (Q, k) int64`` gallery indices (query indices in leave-one-out, the query itself left
    out), ``distances (Q, k) float32`` ascending, ``relevant (Q, k) bool`` (same label), and
    ``ignored (Q, k) bool``: items the re-ID protocol removes (same identity and same camera), which
    are listed but neither relevant nor wrong.

    Bound (:meth:`from_eval`) it also knows the ``query`` and ``gallery`` embedding sets (``gallery``
    None: leave-one-out), ``class_names`` (class id -> name) and how to load each side's images
    (``load_query``, ``load_gallery``: a dataset's ``load``, or the sets' ``paths`` opened with PIL).
    """

    indices: np.ndarray
    distances: np.ndarray
    relevant: np.ndarray
    ignored: np.ndarray
    query: Optional[EmbeddingSet] = field(default=None, repr=False)
    gallery: Optional[EmbeddingSet] = field(default=None, repr=False)
    class_names: Optional[Dict[int, str]] = field(default=None, repr=False)
    load_query: Optional[ImageLoader] = field(default=None, repr=False)
    load_gallery: Optional[ImageLoader] = field(default=None, repr=False)

    @classmethod
    def from_eval(cls, result: "EvalResult", splits: Any = None, *, dataset: Any = None, gallery_dataset: Any = None,
                  class_names: Optional[Dict[int, str]] = None) -> "RetrievalResults":
        """``result.neighbours`` bound to ``result``'s embedding sets, and to the images and class
        names of ``splits`` (a :class:`~deepmetric.data.DataSplits`: its ``query``, ``gallery`` and
        ``class_names``) or of ``dataset`` / ``gallery_dataset`` / ``class_names`` given one by one.
        Without datasets the images are read from the embedding sets' paths.

        Raises ``ValueError`` for a result with no neighbours (verification, or
        ``Evaluator.run(model, neighbours=False)``).
        """
        if result.neighbours is None:
            raise ValueError(f"this {result.protocol} evaluation kept no neighbours: run Evaluator.run(model) with "
                             "neighbours=True (retrieval and re-ID protocols)")
        if splits is not None:
            dataset = dataset if dataset is not None else splits.query
            gallery_dataset = gallery_dataset if gallery_dataset is not None else splits.gallery
            class_names = class_names if class_names is not None else splits.class_names
        query, gallery = result.query, result.gallery
        load_q = _loader(dataset, query, "query")
        load_g = load_q if gallery is None else _loader(gallery_dataset, gallery, "gallery")
        nb = result.neighbours
        return replace(nb, query=query, gallery=gallery, class_names=dict(class_names) if class_names else None,
                       load_query=load_q, load_gallery=load_g)

    # -- what it holds ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1]) if self.indices.ndim == 2 else 0

    def name(self, label: int) -> str:
        """The class name of ``label`` (the number itself where there are no names)."""
        return self.class_names.get(int(label), str(label)) if self.class_names else str(label)

    def _labels(self) -> tuple:
        if self.query is None:
            raise ValueError("these results are not bound to their embeddings: make them with "
                             "RetrievalResults.from_eval(result, splits)")
        ref = self.query if self.gallery is None else self.gallery
        return self.query.labels, ref.labels

    def verdict(self, q: int, j: int) -> str:
        """``relevant``, ``wrong`` or ``ignored`` for neighbour ``j`` of query ``q`` (see :data:`COLOURS`)."""
        return "ignored" if self.ignored[q, j] else "relevant" if self.relevant[q, j] else "wrong"

    def pick_queries(self, n: int, seed: int = 0, wrong_first: int = 0) -> np.ndarray:
        """``n`` query indices drawn with ``seed``, then up to ``wrong_first`` whose first neighbour is wrong."""
        q = len(self)
        drawn = np.random.default_rng(seed).choice(q, size=min(n, q), replace=False)
        first_wrong = np.flatnonzero(~self.relevant[:, 0] & ~self.ignored[:, 0])[:wrong_first] if self.k else []
        return np.concatenate([drawn, first_wrong]).astype(np.int64)

    def records(self, query_labels: Optional[np.ndarray] = None, gallery_labels: Optional[np.ndarray] = None,
                query_paths: Optional[Sequence[str]] = None,
                gallery_paths: Optional[Sequence[str]] = None) -> Iterator[dict]:
        """One JSON-ready dict per query: ``query``, ``label``, (``path``), ``neighbours`` list of
        ``{index, label, distance, relevant, ignored, (path)}``. Bound results fill in what is not given."""
        if query_labels is None or gallery_labels is None:
            query_labels, gallery_labels = self._labels()
            ref = self.query if self.gallery is None else self.gallery
            query_paths = query_paths if query_paths is not None else self.query.paths
            gallery_paths = gallery_paths if gallery_paths is not None else ref.paths
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

    # -- pictures --------------------------------------------------------------------------------------

    def _rows(self, n_queries: int, top_k: int, queries: Optional[Sequence[int]], seed: int) -> tuple:
        if self.load_query is None or self.load_gallery is None:
            raise ValueError("no images to draw: bind the results with RetrievalResults.from_eval(result, splits), "
                             "or give embedding sets with paths")
        if not 1 <= top_k <= self.k:
            raise ValueError(f"top_k={top_k}: these results hold each query's top {self.k}; ask for 1..{self.k}, or "
                             "compute more with deepmetric.evaluation.retrieval_results(..., k=K)")
        rows = self.pick_queries(n_queries, seed) if queries is None else np.asarray(queries, np.int64).reshape(-1)
        if len(rows) == 0 or rows.min() < 0 or rows.max() >= len(self):
            raise ValueError(f"queries: indices in 0..{len(self) - 1} expected, got {rows.tolist()[:8]}")
        return rows, top_k

    def plot(self, n_queries: int = 8, top_k: int = 5, queries: Optional[Sequence[int]] = None, seed: int = 0,
             title: Optional[str] = None):
        """A ``matplotlib.figure.Figure``: a row per query (``queries``, or ``n_queries`` drawn with
        ``seed``), the query image then its ``top_k`` neighbours framed green (same class), red
        (another class) or grey (ignored), each titled with its class name; a legend says which is which.
        Drawn by :func:`deepmetric.viz.retrieval.plot`."""
        return _drawer().plot(self, *self._rows(n_queries, top_k, queries, seed), title)

    def to_html(self, path: str | Path, n_queries: int = 8, top_k: int = 5, queries: Optional[Sequence[int]] = None,
                seed: int = 0, thumb: int = 96) -> Path:
        """Write one self-contained page (images inlined as base64 PNG thumbnails of at most ``thumb``
        pixels a side) of the same rows as :meth:`plot`, atomically; returns ``path``. Drawn by
        :func:`deepmetric.viz.retrieval.page`."""
        return atomic_write(path, _drawer().page(self, *self._rows(n_queries, top_k, queries, seed), thumb))

    def __repr__(self) -> str:
        shape = f"{len(self)} queries, top {self.k}"
        if self.query is None:
            return f"RetrievalResults({shape}, unbound)"
        where = "leave-one-out" if self.gallery is None else f"gallery of {len(self.gallery)}"
        first = float(self.relevant[:, 0].mean()) if len(self) and self.k else float("nan")
        classes = len(np.unique(self.query.labels))
        return f"RetrievalResults({shape}, {where}, {classes} query classes, first neighbour relevant {first:.3f})"

    def _repr_html_(self) -> str:
        """A notebook shows the summary and four queries' rows (thumbnails) when the results are bound."""
        if self.load_query is None or self.load_gallery is None or not len(self) or not self.k:
            return f"<p><code>{html.escape(repr(self))}</code></p>"
        return _drawer().notebook(self)


def _drawer() -> Any:
    """:mod:`deepmetric.viz.retrieval`, as ``deepmetric`` registered it (core imports nothing above it)."""
    return drawer("retrieval")


def _loader(dataset: Any, es: Optional[EmbeddingSet], side: str) -> Optional[ImageLoader]:
    """``dataset.load`` (its length checked against the embeddings), else PIL over the embeddings' paths."""
    if dataset is not None:
        if es is not None and len(dataset) != len(es):
            raise ValueError(f"the {side} dataset has {len(dataset)} images but the evaluation embedded {len(es)}: "
                             "pass the splits the evaluation ran on")
        return dataset.load
    if es is not None and es.paths is not None:
        paths = es.paths

        def load(i: int) -> Any:
            from PIL import Image

            with Image.open(paths[i]) as im:
                return im.convert("RGB")

        return load
    return None


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

    def retrieval(self, splits: Any = None, **kwargs: Any) -> RetrievalResults:
        """The top neighbours as bound :class:`RetrievalResults` (see :meth:`RetrievalResults.from_eval`):
        ``result.retrieval(splits).plot()``."""
        return RetrievalResults.from_eval(self, splits, **kwargs)
