"""The drawing of :class:`~deepmetric.core.results.RetrievalResults`: the grid of queries and their
top neighbours, as a matplotlib figure (the object API: no pyplot, no global backend), a
self-contained HTML page and a notebook view. ``deepmetric`` registers this module in
:mod:`deepmetric.core.drawing`, so ``results.plot()`` and ``results.to_html()`` call it and the
report draws the same grid; core itself imports nothing above it.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Optional

import numpy as np

from ..core.results import COLOURS, MARKS, RetrievalResults

_CSS = (".dm-retrieval td{text-align:center;font-size:11px;padding:3px;vertical-align:top}"
        ".dm-retrieval img{image-rendering:pixelated;min-width:48px}")
_LEGEND = (("relevant", "same class"), ("wrong", "another class"), ("ignored", "ignored (same camera)"))


def plot(results: RetrievalResults, rows: np.ndarray, k: int, title: Optional[str] = None):
    """The figure of ``rows`` (query indices), each with its top ``k`` (checked by the caller)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    qlab, glab = results._labels()
    fig = Figure(figsize=(1.3 * (k + 1), 1.35 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), k + 1, squeeze=False)
    for r, q in enumerate(rows.tolist()):
        _show(axes[r, 0], results.load_query(q), f"query: {results.name(qlab[q])}", "#222222", 1)
        for j in range(k):
            v = results.verdict(q, j)
            g = int(results.indices[q, j])
            _show(axes[r, j + 1], results.load_gallery(g), f"{results.name(glab[g])} {MARKS[v]}", COLOURS[v], 3)
            axes[r, j + 1].set_xlabel(f"{results.distances[q, j]:.3f}", fontsize=6)
    legend = [Patch(edgecolor=COLOURS[v], facecolor="none", linewidth=2, label=label) for v, label in _LEGEND
              if v != "ignored" or results.ignored.any()]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.suptitle(title or f"{len(rows)} queries and their top {k} (distance under each)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def page(results: RetrievalResults, rows: np.ndarray, k: int, thumb: int) -> str:
    """One self-contained HTML page of ``rows``: images inlined as PNG thumbnails of ``thumb`` px a side."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>retrieval results</title>'
            f"<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}{_CSS}</style></head>"
            f"<body><h1>retrieval results</h1><p>{html.escape(repr(results))}</p>"
            f"{table(results, rows, k, thumb)}</body></html>")


def notebook(results: RetrievalResults) -> str:
    """The notebook view: the summary and four queries' rows as thumbnails."""
    head = f"<p><code>{html.escape(repr(results))}</code></p>"
    return f"<style>{_CSS}</style>{head}{table(results, results.pick_queries(4), min(5, results.k), 64)}"


def table(results: RetrievalResults, rows: np.ndarray, k: int, thumb: int) -> str:
    qlab, glab = results._labels()

    def cell(image: Any, caption: str, colour: str) -> str:
        return (f'<td><img style="border:3px solid {colour}" src="data:image/png;base64,{_png64(image, thumb)}">'
                f"<br>{html.escape(caption)}</td>")

    lines = []
    for q in rows.tolist():
        cells = [cell(results.load_query(q), f"query {q}: {results.name(qlab[q])}", "#222222")]
        for j in range(k):
            v, g = results.verdict(q, j), int(results.indices[q, j])
            cells.append(cell(results.load_gallery(g),
                              f"{results.name(glab[g])} {MARKS[v]} {results.distances[q, j]:.3f}", COLOURS[v]))
        lines.append("<tr>" + "".join(cells) + "</tr>")
    key = " ".join(f'<span style="border:3px solid {COLOURS[v]};padding:0 4px">{label}</span>' for v, label in
                   (("relevant", "same class"), ("wrong", "another class"), ("ignored", "ignored")))
    return f'<p>{key}</p><table class="dm-retrieval">{"".join(lines)}</table>'


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
