"""Matplotlib figures for reports: curves, Recall@K bars, retrieval grids, embedding projection, ROC.

Every function takes plain data and returns a saved PNG path; nothing here knows about training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import matplotlib
import numpy as np

from ..core.files import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


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


def _as_image(x) -> np.ndarray:
    if hasattr(x, "convert"):  # PIL
        return np.asarray(x.convert("RGB"))
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    return a.squeeze()


def _name(names: Optional[Dict[int, str]], label: int) -> str:
    return names.get(int(label), str(label)) if names else str(label)


def retrieval_grid(path: Path, load, query_ids: Sequence[int], neighbours: np.ndarray, query_labels: np.ndarray,
                   ref_labels: np.ndarray, load_ref=None, title: str = "queries and their top neighbours",
                   class_names: Optional[Dict[int, str]] = None) -> Path:
    """Rows: a query, then its top-k neighbours framed green (same label) or red (different).
    Labels are shown by ``class_names`` (class id -> name) where given."""
    load_ref = load_ref or load
    k = neighbours.shape[1]
    rows = len(query_ids)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.35 * rows), squeeze=False)
    for r, q in enumerate(query_ids):
        ax = axes[r, 0]
        ax.imshow(_as_image(load(int(q))), cmap="gray")
        ax.set_title(f"query {_name(class_names, query_labels[q])}", fontsize=7)
        for j in range(k):
            n = int(neighbours[q, j])
            a = axes[r, j + 1]
            a.imshow(_as_image(load_ref(n)), cmap="gray")
            ok = ref_labels[n] == query_labels[q]
            for s in a.spines.values():
                s.set_color("#1a9850" if ok else "#d73027")
                s.set_linewidth(3)
            a.set_title(f"{_name(class_names, ref_labels[n])} {'✓' if ok else '✗'}", fontsize=7,
                        color="#1a9850" if ok else "#d73027")
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def projection_plot(path: Path, vectors: np.ndarray, labels: np.ndarray, seed: int = 0,
                    class_names: Optional[Dict[int, str]] = None, max_classes: int = 20,
                    max_points: int = 1000) -> Path:
    """2-D t-SNE of the embeddings of at most ``max_classes`` classes (drawn with ``seed`` when
    there are more) and ``max_points`` points, coloured by class: bounded time on any test set."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) > max_classes:
        classes = np.sort(rng.choice(classes, max_classes, replace=False))
    idx = np.flatnonzero(np.isin(labels, classes))
    if len(idx) > max_points:
        idx = np.sort(rng.choice(idx, max_points, replace=False))
    v, y = np.asarray(vectors, dtype=np.float32)[idx], labels[idx]
    if len(v) >= 10:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(v) // 4)).fit_transform(v)
        method = "t-SNE"
    else:
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2).fit_transform(v)
        method = "PCA"
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
