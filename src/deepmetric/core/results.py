"""Typed results handed from the evaluator to reports and files: no dictionaries to guess from.

- :class:`RetrievalResults`: each query's top-k gallery items, their distances and relevance (the
  ranking itself, as OML's ``RetrievalResults`` keeps it), from
  :func:`deepmetric.evaluation.retrieval_results`; bound to its embedding sets, class names and images
  (:meth:`RetrievalResults.from_eval`) it draws itself (:meth:`~RetrievalResults.plot`,
  :meth:`~RetrievalResults.to_html`, and in a notebook);
- :class:`PairScores`: a verification protocol's pairs, each with its distance and truth;
- :class:`EvalResult`: one evaluation: the metrics, the embedding sets and, by protocol, the top
  neighbours (retrieval, re-ID) or the pair scores (verification).

The retrieval figure is drawn here, with matplotlib's object API (no pyplot, no global backend), so
the report (:mod:`deepmetric.viz`, which may import core but not the reverse) and ``plot()`` draw
the same grid.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Literal, Optional, Sequence

import numpy as np

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
        (another class) or grey (ignored), each titled with its class name; a legend says which is which."""
        from matplotlib.figure import Figure

        rows, k = self._rows(n_queries, top_k, queries, seed)
        qlab, glab = self._labels()
        fig = Figure(figsize=(1.3 * (k + 1), 1.35 * len(rows) + 0.5))
        axes = fig.subplots(len(rows), k + 1, squeeze=False)
        for r, q in enumerate(rows.tolist()):
            _show(axes[r, 0], self.load_query(q), f"query: {self.name(qlab[q])}", "#222222", 1)
            for j in range(k):
                v = self.verdict(q, j)
                g = int(self.indices[q, j])
                _show(axes[r, j + 1], self.load_gallery(g), f"{self.name(glab[g])} {MARKS[v]}", COLOURS[v], 3)
                axes[r, j + 1].set_xlabel(f"{self.distances[q, j]:.3f}", fontsize=6)
        from matplotlib.patches import Patch

        legend = [Patch(edgecolor=COLOURS[v], facecolor="none", linewidth=2, label=label) for v, label in
                  (("relevant", "same class"), ("wrong", "another class"), ("ignored", "ignored (same camera)"))
                  if v != "ignored" or self.ignored.any()]
        fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
        fig.suptitle(title or f"{len(rows)} queries and their top {k} (distance under each)", fontsize=9)
        fig.tight_layout(rect=(0, 0.04, 1, 0.97))
        return fig

    def to_html(self, path: str | Path, n_queries: int = 8, top_k: int = 5, queries: Optional[Sequence[int]] = None,
                seed: int = 0, thumb: int = 96) -> Path:
        """Write one self-contained page (images inlined as base64 PNG thumbnails of at most ``thumb``
        pixels a side) of the same rows as :meth:`plot`, atomically; returns ``path``."""
        body = self._html_table(*self._rows(n_queries, top_k, queries, seed), thumb)
        page = (f'<!doctype html><html><head><meta charset="utf-8"><title>retrieval results</title>'
                f"<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}{_CSS}</style></head>"
                f"<body><h1>retrieval results</h1><p>{html.escape(repr(self))}</p>{body}</body></html>")
        return atomic_write(path, page)

    def _html_table(self, rows: np.ndarray, k: int, thumb: int) -> str:
        qlab, glab = self._labels()

        def cell(image: Any, caption: str, colour: str) -> str:
            return (f'<td><img style="border:3px solid {colour}" src="data:image/png;base64,{_png64(image, thumb)}">'
                    f"<br>{html.escape(caption)}</td>")

        lines = []
        for q in rows.tolist():
            cells = [cell(self.load_query(q), f"query {q}: {self.name(qlab[q])}", "#222222")]
            for j in range(k):
                v, g = self.verdict(q, j), int(self.indices[q, j])
                cells.append(cell(self.load_gallery(g), f"{self.name(glab[g])} {MARKS[v]} {self.distances[q, j]:.3f}",
                                  COLOURS[v]))
            lines.append("<tr>" + "".join(cells) + "</tr>")
        key = " ".join(f'<span style="border:3px solid {COLOURS[v]};padding:0 4px">{label}</span>' for v, label in
                       (("relevant", "same class"), ("wrong", "another class"), ("ignored", "ignored")))
        return f'<p>{key}</p><table class="dm-retrieval">{"".join(lines)}</table>'

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
        head = f"<p><code>{html.escape(repr(self))}</code></p>"
        if self.load_query is None or self.load_gallery is None or not len(self) or not self.k:
            return head
        return f"<style>{_CSS}</style>{head}{self._html_table(self.pick_queries(4), min(5, self.k), 64)}"


_CSS = (".dm-retrieval td{text-align:center;font-size:11px;padding:3px;vertical-align:top}"
        ".dm-retrieval img{image-rendering:pixelated;min-width:48px}")


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


def as_image(x: Any) -> np.ndarray:
    """A PIL image or an ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` array (or tensor) as an array ``imshow`` draws."""
    if hasattr(x, "convert"):  # PIL
        return np.asarray(x.convert("RGB"))
    if hasattr(x, "detach"):  # a tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    return a.squeeze()


def _show(ax: Any, image: Any, title: str, colour: str, width: float) -> None:
    a = as_image(image)
    ax.imshow(a, cmap="gray" if a.ndim == 2 else None)
    for s in ax.spines.values():
        s.set_color(colour)
        s.set_linewidth(width)
    ax.set_title(title, fontsize=7, color=colour if width > 1 else "#222222")
    ax.set_xticks([])
    ax.set_yticks([])


def _png64(image: Any, thumb: int) -> str:
    from PIL import Image

    a = as_image(image)
    if a.dtype != np.uint8:  # floats in [0, 1] or any range: stretch to 0..255
        lo, hi = float(np.min(a)), float(np.max(a))
        a = ((a - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
    im = Image.fromarray(a)
    scale = thumb / max(im.size)
    if scale > 1:  # small images (digits are 8 x 8) are enlarged without blurring
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
    else:
        im.thumbnail((thumb, thumb))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
