"""``csv``: a CSV list with a header naming the path and label columns (your own data, any layout).

Paths are relative to the CSV's folder. Labels that are all integers are used as class ids;
otherwise labels are class names, numbered in sorted order (``splits.class_names``). A split
column (``train``/``query``/``gallery``/``test``, any case) chooses the protocol: ``query`` +
``gallery`` rows give query/gallery retrieval, ``test`` rows leave-one-out retrieval; without a
split column every row trains and is queried, and ``data.train_classes`` splits the classes.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..base import DataError, DataSplits
from ..io import ImageListDataset, list_file, read_csv, to_int
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
    exclude: Sequence[str] = (),
) -> DataSplits:
    """Read ``root/file`` (``root`` may also be the CSV file itself); rows whose path is in
    ``exclude`` are left out."""
    root, path = list_file(root, file, "csv", f"a CSV with a header row naming '{path_column}' and "
                                              f"'{label_column}' columns")
    required = [path_column, label_column] + [c for c in (split_column, camera_column) if c]
    rows = read_csv(path, required, delimiter=delimiter)
    if exclude:
        gone = {os.path.normpath(p) for p in exclude}
        rows = [(line, r) for line, r in rows if os.path.normpath(r[path_column]) not in gone]
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    labels, class_names = labels_of([r[label_column] for _, r in rows])
    camids = None
    if camera_column:
        camids = np.array([to_int(r[camera_column], path, line, camera_column) for line, r in rows], dtype=np.int64)
    base = ImageListDataset([r[path_column] for _, r in rows], labels, camids=camids, root=root, name="csv")
    if split_column is None:
        return all_classes_splits(base, class_names, train_transform, test_transform)
    return _column_splits(base, _split_of_rows(rows, split_column, path), class_names, train_transform, test_transform)


def labels_of(raw: List[str]) -> Tuple[np.ndarray, Optional[List[str]]]:
    """``(labels (N,) int64, class names)``: integer labels as they are (no names), else names
    numbered in sorted order."""
    if all(_is_int(v) for v in raw):
        return np.array([int(v) for v in raw], dtype=np.int64), None
    names, labels = np.unique(np.array(raw, dtype=object).astype(str), return_inverse=True)
    return labels.astype(np.int64), names.tolist()


def _split_of_rows(rows: List[Tuple[int, dict]], column: str, path: str) -> np.ndarray:
    """Each row's split (``train``/``query``/``gallery``/``test``), refusing a mix of protocols."""
    split = []
    for line, r in rows:
        value = r[column].strip().lower()
        if value not in _SPLITS:
            raise DataError(f"{path} line {line}: column '{column}' must be one of {', '.join(_SPLITS)}, got {r[column]!r}")
        split.append(value)
    split = np.array(split)
    has = {s: bool((split == s).any()) for s in _SPLITS}
    if has["test"] and (has["query"] or has["gallery"]):
        raise DataError(f"{path}: column '{column}' mixes 'test' (leave-one-out) with 'query'/'gallery' rows; use one protocol")
    if has["query"] != has["gallery"]:
        raise DataError(f"{path}: column '{column}' has {'query' if has['query'] else 'gallery'} rows but no "
                        f"{'gallery' if has['query'] else 'query'} rows (query/gallery retrieval needs both)")
    return split


def _column_splits(base: ImageListDataset, split: np.ndarray, class_names: Optional[List[str]],
                   train_transform: Optional[Callable], test_transform: Optional[Callable]) -> DataSplits:
    """The splits the split column names: ``test`` rows leave-one-out, else ``query`` + ``gallery``."""
    def view(s: str, transform):
        if not (split == s).any():
            return None
        return base.subset(np.flatnonzero(split == s), name=f"csv/{s}").with_transform(transform)

    train = view("train", train_transform)
    train_ids = None
    if train is not None:
        train_ids, inverse = np.unique(train.labels, return_inverse=True)
        train.labels = inverse.astype(np.int64)
    if (split == "test").any():
        query, gallery = view("test", test_transform), None  # leave-one-out on the test rows
    else:
        query, gallery = view("query", test_transform), view("gallery", test_transform)
    names = None if class_names is None else dict(enumerate(class_names))
    return DataSplits(train=train, query=query, gallery=gallery, train_class_ids=train_ids, class_names=names)


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False
