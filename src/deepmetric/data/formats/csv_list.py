"""``csv``: a CSV list with a header naming the path and label columns (your own data, any layout).

Paths are relative to the CSV's folder. Labels that are all integers are used as class ids;
otherwise labels are class names, numbered in sorted order (``info["class_names"]``). A split
column (``train``/``query``/``gallery``/``test``, any case) chooses the protocol: ``query`` +
``gallery`` rows give query/gallery retrieval, ``test`` rows leave-one-out retrieval; without a
split column the class-split options of ``image_folder`` apply.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

from ...registry import DATASETS
from ..base import DataError, DataSplits, relabel
from ..io import ImageListDataset, read_csv, require_root, to_int
from .folder import split_by_class

_SPLITS = ("train", "query", "gallery", "test")


@DATASETS.register("csv")
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
    train_classes: Optional[Sequence[str | int]] = None,
    test_classes: Optional[Sequence[str | int]] = None,
    train_fraction: Optional[float] = None,
) -> DataSplits:
    """Read ``root/file`` (``root`` may also be the CSV file itself)."""
    if root is not None and os.path.isfile(os.path.expanduser(str(root))):
        root, file = os.path.split(os.path.expanduser(str(root)))
    root = require_root(root, "csv", f"the folder holding {file}")
    path = os.path.join(root, file)
    if not os.path.isfile(path):
        raise DataError(f"csv root {root}: missing {file} (expected a CSV with a header row naming "
                        f"'{path_column}' and '{label_column}' columns; set data.file to its name)")
    if split_column is not None and (train_classes, test_classes, train_fraction) != (None, None, None):
        raise ValueError("csv: give split_column or a class split (train_classes/test_classes/train_fraction), not both")
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
    info = {"format": "csv", "root": root, "file": path}
    if class_names is not None:
        info["class_names"] = class_names

    if split_column is None:
        return split_by_class(
            base, class_names, _ids(train_classes, class_names, labels, path, "train_classes"),
            _ids(test_classes, class_names, labels, path, "test_classes"),
            train_fraction, train_transform, test_transform, info,
        )

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

    def view(s: str, transform, relabelled: bool = False):
        if not has[s]:
            return None
        v = base.subset(np.flatnonzero(split == s), name=f"csv/{s}").with_transform(transform)
        if relabelled:
            info["train_class_ids"] = np.unique(v.labels).tolist()
            v.labels = relabel(v.labels)
        return v

    train = view("train", train_transform, relabelled=True)
    if has["test"]:
        query, gallery = view("test", test_transform), None
        info["protocol"] = "leave-one-out on the test rows"
    else:
        query, gallery = view("query", test_transform), view("gallery", test_transform)
        info["protocol"] = "query/gallery retrieval"
    return DataSplits(train=train, query=query, gallery=gallery, info=info)


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def _ids(wanted, class_names, labels, path, option) -> Optional[list[int]]:
    if wanted is None:
        return None
    if isinstance(wanted, (str, int)):
        wanted = [wanted]
    if class_names is None:
        try:
            return [int(w) for w in wanted]
        except ValueError:
            raise DataError(f"{path}: {option} must list integer labels (the label column is numeric), got {list(wanted)}") from None
    index = {n: i for i, n in enumerate(class_names)}
    unknown = [str(w) for w in wanted if str(w) not in index]
    if unknown:
        raise DataError(f"{path}: {option} names labels that do not occur: {', '.join(unknown[:10])}")
    return [index[str(w)] for w in wanted]
