"""Look at a dataset before training on it: counts per split, and files that will not load.

``summarize(splits)`` gives numbers (and warnings for things the metrics would otherwise skip
quietly, such as leave-one-out classes with a single image); ``find_unreadable(dataset)`` opens
every image; ``format_summary`` prints the summary for ``deepmetric data check``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from .base import DataError, DataSplits, MetricDataset
from .io import load_image

#: images-per-class histogram buckets: (label, low, high) inclusive
BUCKETS = (("1", 1, 1), ("2", 2, 2), ("3-5", 3, 5), ("6-10", 6, 10), ("11-50", 11, 50), (">50", 51, None))


def images_per_class(labels: np.ndarray) -> dict[str, int]:
    """How many classes have 1, 2, 3-5, 6-10, 11-50, >50 images."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    return {
        name: int(((counts >= lo) & (True if hi is None else counts <= hi)).sum())
        for name, lo, hi in BUCKETS
    }


def summarize_dataset(dataset: MetricDataset) -> dict:
    """``{"images", "classes", "images_per_class": {bucket: n_classes}, "min"/"median"/"max_per_class"}``
    plus ``"cameras"`` when the dataset has camera ids."""
    labels = dataset.labels
    counts = np.unique(labels, return_counts=True)[1] if len(labels) else np.zeros(0, np.int64)
    out = {
        "images": int(len(labels)),
        "classes": int(len(counts)),
        "images_per_class": images_per_class(labels),
        "min_per_class": int(counts.min()) if len(counts) else 0,
        "median_per_class": float(np.median(counts)) if len(counts) else 0.0,
        "max_per_class": int(counts.max()) if len(counts) else 0,
    }
    if dataset.camids is not None:
        out["cameras"] = int(len(np.unique(dataset.camids)))
    return out


def summarize(splits: DataSplits) -> dict:
    """Numbers for each split of ``splits``.

    Returns ``{"protocol", "num_classes" (training classes), "splits": {"train"|"query"|"gallery":
    summarize_dataset(...)}, "pairs": {...} (verification only), "warnings": [str]}``. Warnings name
    what evaluation would skip: leave-one-out query classes with one image, query classes absent
    from the gallery, and test classes that also occur in training (not zero-shot).
    """
    out: dict = {"num_classes": splits.num_classes, "splits": {}, "warnings": []}
    for name in ("train", "query", "gallery"):
        ds = getattr(splits, name)
        if ds is not None:
            out["splits"][name] = summarize_dataset(ds)
    warn = out["warnings"]
    if splits.pairs is not None:
        p = splits.pairs
        out["protocol"] = "verification"
        out["pairs"] = {
            "pairs": int(len(p.is_same)), "same": int(p.is_same.sum()), "different": int((~p.is_same).sum()),
            "folds": None if p.fold is None else int(len(np.unique(p.fold))), "images": int(len(p.images)),
        }
    elif splits.query is not None and splits.gallery is None:
        out["protocol"] = "leave-one-out"
        single = out["splits"]["query"]["images_per_class"]["1"]
        if single:
            warn.append(f"{single} query classes have a single image: leave-one-out skips those queries")
    elif splits.query is not None:
        out["protocol"] = "query/gallery"
        missing = np.setdiff1d(splits.query.labels, splits.gallery.labels)
        if len(missing):
            n_q = int(np.isin(splits.query.labels, missing).sum())
            warn.append(f"{len(missing)} query classes ({n_q} queries) have no gallery image: those queries are skipped")
    else:
        out["protocol"] = "training only"
    return out


def format_summary(summary: dict) -> str:
    """A plain-text table of :func:`summarize`'s output."""
    buckets = [b[0] for b in BUCKETS]
    lines = [f"protocol: {summary.get('protocol', '?')}    training classes: {summary.get('num_classes', 0)}"]
    if summary["splits"]:
        lines.append("(last columns: how many classes have 1, 2, 3-5, ... images)")
        lines.append(f"{'split':<8} {'images':>9} {'classes':>8} {'cams':>5}  " + " ".join(f"{b:>6}" for b in buckets))
        for name, s in summary["splits"].items():
            hist = " ".join(f"{s['images_per_class'][b]:>6}" for b in buckets)
            lines.append(f"{name:<8} {s['images']:>9} {s['classes']:>8} {str(s.get('cameras', '-')):>5}  {hist}")
    if "pairs" in summary:
        p = summary["pairs"]
        lines.append(f"pairs: {p['pairs']} ({p['same']} same, {p['different']} different) over "
                     f"{p['images']} images, {p['folds']} folds")
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


def find_unreadable(dataset: MetricDataset, max_workers: int = 8, max_pixels: Optional[int] = None) -> list[tuple[str, str]]:
    """Open every image of ``dataset``; returns ``(path, reason)`` for each that fails, in order.

    Uses ``dataset.paths`` with :func:`~deepmetric.data.io.load_image` (threads: decoding releases
    the GIL); a dataset without paths is checked through ``dataset.load(i)``.
    """
    n = len(dataset)
    paths = dataset.paths

    def probe(i: int) -> Optional[tuple[str, str]]:
        name = paths[i] if paths is not None else f"{dataset.name}[{i}]"
        try:
            if paths is not None:
                load_image(paths[i], max_pixels)
            else:
                dataset.load(i)
        except DataError as e:
            return name, _reason(str(e), name)
        except Exception as e:  # a custom dataset's load may raise anything; report, don't stop
            return name, f"{type(e).__name__}: {e}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, int(max_workers))) as pool:
        results = list(pool.map(probe, range(n)))
    return [r for r in results if r is not None]


def _reason(message: str, path: str) -> str:
    prefix = f"image {path}: "
    return message[len(prefix):] if message.startswith(prefix) else message
