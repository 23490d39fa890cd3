"""Matplotlib figures for reports: curves, Recall@K bars, retrieval grids, embedding projection, ROC.

Every function takes plain data and returns a saved PNG path; nothing here knows about training.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import matplotlib
import numpy as np

from ..core.files import atomic_write
from ..core.results import RetrievalResults

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("deepmetric")


def _save(fig, path: Path) -> Path:
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)  # a no-op for a Figure pyplot does not manage


def curve_plot(path: Path, series: Dict[str, Sequence[tuple]], title: str, ylabel: str) -> Path:
    """``series`` maps a name to ``[(step, value), ...]``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def recall_bars(path: Path, columns: Dict[str, Dict[str, float]], ks: Sequence[int]) -> Path:
    """Grouped bars of Recall@K, one group per K, one bar per column (e.g. untrained / trained)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    width = 0.8 / max(1, len(columns))
    x = np.arange(len(ks))
    for j, (name, metrics) in enumerate(columns.items()):
        vals = [metrics.get(f"recall@{k}", np.nan) for k in ks]
        bars = ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"R@{k}" for k in ks])
    ax.set_ylim(0, 1.08)
    ax.set_title("Recall@K")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _name(names: Optional[Dict[int, str]], label: int) -> str:
    return names.get(int(label), str(label)) if names else str(label)


def retrieval_grid(path: Path, results: RetrievalResults, queries: Sequence[int], top_k: int = 5,
                   title: str = "queries and their top neighbours") -> Path:
    """Bound ``results`` (:meth:`RetrievalResults.from_eval`) drawn by :meth:`RetrievalResults.plot`:
    rows of a query, then its top-k framed green (same class) or red (another), titled by class name."""
    return _save(results.plot(queries=queries, top_k=min(top_k, results.k), title=title), path)


PROJECTIONS = ("pca", "tsne", "umap")


def _project(v: np.ndarray, method: str, seed: int) -> tuple:
    """``(xy (N, 2), the method's name)``: PCA (exact, deterministic, milliseconds), t-SNE, or UMAP
    (if ``umap-learn`` is installed; PCA otherwise, with a warning). Fewer than 10 points: PCA."""
    if method == "umap":
        try:
            import umap
        except ImportError:
            log.warning("eval.projection=umap but umap-learn is not installed (pip install umap-learn): "
                        "drawing PCA instead")
            method = "pca"
        else:
            if len(v) >= 10:
                return umap.UMAP(n_components=2, random_state=seed).fit_transform(v), "UMAP"
    if method == "tsne" and len(v) >= 10:
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(v) // 4)).fit_transform(v), \
            "t-SNE"
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r} (valid: {', '.join(PROJECTIONS)})")
    from sklearn.decomposition import PCA

    n = min(2, *v.shape)
    xy = PCA(n_components=n, svd_solver="full").fit_transform(v) if n else np.zeros((len(v), 0))
    return np.pad(xy, ((0, 0), (0, 2 - n))), "PCA"  # one point or one dimension: the rest is 0


def projection_plot(path: Path, vectors: np.ndarray, labels: np.ndarray, seed: int = 0,
                    class_names: Optional[Dict[int, str]] = None, max_classes: int = 20,
                    max_points: int = 1000, method: str = "pca") -> Path:
    """2-D ``method`` projection (:data:`PROJECTIONS`; see :func:`_project`) of the embeddings of at most
    ``max_classes`` classes (drawn with ``seed`` when there are more) and ``max_points`` points,
    coloured and named by class: bounded time on any test set (t-SNE of 1000 points: seconds)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) > max_classes:
        classes = np.sort(rng.choice(classes, max_classes, replace=False))
    idx = np.flatnonzero(np.isin(labels, classes))
    if len(idx) > max_points:
        idx = np.sort(rng.choice(idx, max_points, replace=False))
    v, y = np.asarray(vectors, dtype=np.float32)[idx], labels[idx]
    xy, method = _project(v, method, seed)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(np.unique(y)):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i % cmap.N), label=_name(class_names, c))
    ax.set_xticks([])
    ax.set_yticks([])
    some = f"{len(np.unique(y))} of {len(np.unique(labels))} classes" if len(np.unique(labels)) > len(classes) else "by class"
    ax.set_title(f"test embeddings ({method}), {some}", fontsize=9)
    ax.legend(markerscale=2.5, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def roc_plot(path: Path, distances: np.ndarray, is_same: np.ndarray) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(is_same).astype(int), -np.asarray(distances))
    auc = roc_auc_score(np.asarray(is_same).astype(int), -np.asarray(distances))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(fpr, tpr, label=f"AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("verification ROC")
    ax.legend(loc="lower right")
    return _save(fig, path)
