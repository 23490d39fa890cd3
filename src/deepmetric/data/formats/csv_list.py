"""``csv``: a CSV list with a header naming the path and label columns (your own data, any layout).

Paths are relative to the CSV's folder. Labels that are all integers are used as class ids;
otherwise labels are class names, numbered in sorted order (``splits.class_names``). A split
column (``train``/``query``/``gallery``/``test``, any case) chooses the protocol: ``query`` +
``gallery`` rows give query/gallery retrieval, ``test`` rows leave-one-out retrieval; without a
split column every row trains and is queried, and ``data.train_classes`` splits the classes.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from ..base import DataError, DataSplits
from ..io import ImageListDataset, read_csv, require_root, to_int
from .folder import all_classes_splits

_SPLITS = ("train", "query", "gallery", "test")


def build_csv(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    file: str = "list.csv",
    path_column: str = "path",
    label_column: str = "label",
    split_column: Optional[str] = None,
    camera_column: Optional[str] = None,
    delimiter: str = ",",
) -> DataSplits:
    """Read ``root/file`` (``root`` may also be the CSV file itself)."""
    if root is not None and os.path.isfile(os.path.expanduser(str(root))):
        root, file = os.path.split(os.path.expanduser(str(root)))
    root = require_root(root, "csv", f"the folder holding {file}")
    path = os.path.join(root, file)
    if not os.path.isfile(path):
        raise DataError(f"csv root {root}: missing {file} (expected a CSV with a header row naming "
                        f"'{path_column}' and '{label_column}' columns; set {{file}} to its name)", "file")
    required = [path_column, label_column] + [c for c in (split_column, camera_column) if c]
    rows = read_csv(path, required, delimiter=delimiter)
    if not rows:
        raise DataError(f"{path}: no data rows after the header")

    raw = [r[label_column] for _, r in rows]
    numeric = all(_is_int(v) for v in raw)
    if numeric:
        labels = np.array([int(v) for v in raw], dtype=np.int64)
        class_names = None
    else:
        class_names, labels = np.unique(np.array(raw, dtype=object).astype(str), return_inverse=True)
        class_names, labels = class_names.tolist(), labels.astype(np.int64)
    camids = None
    if camera_column:
        camids = np.array([to_int(r[camera_column], path, line, camera_column) for line, r in rows], dtype=np.int64)
    paths = [r[path_column] for _, r in rows]
    base = ImageListDataset(paths, labels, camids=camids, root=root, name="csv")

    if split_column is None:
        return all_classes_splits(base, class_names, train_transform, test_transform)

    split = []
    for line, r in rows:
        value = r[split_column].strip().lower()
        if value not in _SPLITS:
            raise DataError(f"{path} line {line}: column '{split_column}' must be one of {', '.join(_SPLITS)}, got {r[split_column]!r}")
        split.append(value)
    split = np.array(split)
    has = {s: bool((split == s).any()) for s in _SPLITS}
    if has["test"] and (has["query"] or has["gallery"]):
        raise DataError(f"{path}: column '{split_column}' mixes 'test' (leave-one-out) with 'query'/'gallery' rows; use one protocol")
    if has["query"] != has["gallery"]:
        raise DataError(f"{path}: column '{split_column}' has {'query' if has['query'] else 'gallery'} rows but no "
                        f"{'gallery' if has['query'] else 'query'} rows (query/gallery retrieval needs both)")

    def view(s: str, transform):
        if not has[s]:
            return None
        return base.subset(np.flatnonzero(split == s), name=f"csv/{s}").with_transform(transform)

    train = view("train", train_transform)
    train_ids = None
    if train is not None:
        train_ids, inverse = np.unique(train.labels, return_inverse=True)
        train.labels = inverse.astype(np.int64)
    if has["test"]:
        query, gallery = view("test", test_transform), None  # leave-one-out on the test rows
    else:
        query, gallery = view("query", test_transform), view("gallery", test_transform)
    names = None if class_names is None else dict(enumerate(class_names))
    return DataSplits(train=train, query=query, gallery=gallery, train_class_ids=train_ids,
                      class_names=names)


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False
