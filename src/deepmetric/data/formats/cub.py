"""``cub``: CUB-200-2011 for zero-shot retrieval (``images.txt``, ``image_class_labels.txt``, ``images/``).

The deep-metric-learning protocol: classes 1-100 train, 101-200 test, leave-one-out retrieval on
the test images (``train_test_split.txt`` is the classification split and is not used). In general
the first ``num_train_classes`` sorted class ids train (default: half, i.e. 100 on CUB). Train
labels are relabelled to ``0..C-1``; test labels keep the class id.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from ...core.errors import ParameterError
from ..base import DataError, DataSplits, relabel
from ..io import ImageListDataset, descend, read_table, require_in, require_root, to_int

_EXPECTED = "the CUB_200_2011 folder with images.txt, image_class_labels.txt and images/"


def first_classes_split(labels: np.ndarray, num_train_classes: Optional[int], fmt: str) -> np.ndarray:
    """Boolean train mask: the first ``num_train_classes`` sorted class ids (default half)."""
    classes = np.unique(labels)
    n = len(classes) // 2 if num_train_classes is None else int(num_train_classes)
    if not 0 < n < len(classes):
        raise ParameterError(f"{fmt}: {{num_train_classes}} must be in 1..{len(classes) - 1}, got {num_train_classes}",
                             "num_train_classes")
    return np.isin(labels, classes[:n])


def retrieval_splits(paths, labels, root, train_mask, fmt, train_transform, test_transform) -> DataSplits:
    """Train on ``train_mask`` (relabelled), leave-one-out query on the rest (labels kept)."""
    tr, te = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
    train = ImageListDataset([paths[i] for i in tr], relabel(labels[tr]), root=root,
                             transform=train_transform, name=f"{fmt}/train")
    query = ImageListDataset([paths[i] for i in te], labels[te], root=root,
                             transform=test_transform, name=f"{fmt}/test")
    return DataSplits(train=train, query=query, gallery=None,
                      train_class_ids=np.unique(labels[tr]).astype(np.int64))


def build_cub(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    num_train_classes: Optional[int] = None,
) -> DataSplits:
    root = require_root(root, "cub", _EXPECTED)
    root = descend(root, "images.txt", ("CUB_200_2011",))
    images_txt = require_in(root, "images.txt", "CUB", _EXPECTED)
    labels_txt = require_in(root, "image_class_labels.txt", "CUB", _EXPECTED)
    images = read_table(images_txt, ("image_id", "path"), last_column_may_contain_sep=True)
    by_id = {}
    for r in read_table(labels_txt, ("image_id", "class_id")):
        by_id[to_int(r.fields[0], labels_txt, r.line, "image_id")] = to_int(r.fields[1], labels_txt, r.line, "class_id")
    paths, labels = [], []
    for r in images:
        image_id = to_int(r.fields[0], images_txt, r.line, "image_id")
        if image_id not in by_id:
            raise DataError(f"{images_txt} line {r.line}: image id {image_id} has no class in {labels_txt}")
        paths.append(os.path.join("images", r.fields[1]))
        labels.append(by_id[image_id])
    if not paths:
        raise DataError(f"{images_txt}: no image rows")
    labels = np.asarray(labels, dtype=np.int64)
    mask = first_classes_split(labels, num_train_classes, "cub")
    return retrieval_splits(paths, labels, root, mask, "cub", train_transform, test_transform)
