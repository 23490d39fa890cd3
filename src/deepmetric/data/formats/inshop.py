"""``inshop``: DeepFashion In-Shop Clothes Retrieval (``list_eval_partition.txt`` + ``img/``).

``list_eval_partition.txt`` (at the root or in ``Eval/``) starts with the image count, then the
header ``image_name item_id evaluation_status``; each row names an image (relative to the root),
its item (``id_00000001``) and ``train``/``query``/``gallery``. Protocol: query/gallery retrieval
(gallery given, not leave-one-out). Labels are the item numbers; train labels relabelled to
``0..C-1``, query and gallery keep the item number so they match each other.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional

import numpy as np

from ..base import DataError, DataSplits, relabel
from ..io import ImageListDataset, read_table, require_root

_EXPECTED = "the In-shop folder with Eval/list_eval_partition.txt (or list_eval_partition.txt) and img/"
_ITEM = re.compile(r"^id_(\d+)$")
_STATUS = ("train", "query", "gallery")


def _find_list(root: str) -> str:
    for rel in ("list_eval_partition.txt", os.path.join("Eval", "list_eval_partition.txt")):
        if os.path.isfile(os.path.join(root, rel)):
            return os.path.join(root, rel)
    raise DataError(f"In-shop root {root}: missing list_eval_partition.txt (expected {_EXPECTED})")


def build_inshop(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
) -> DataSplits:
    root = require_root(root, "inshop", _EXPECTED)
    path = _find_list(root)
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline().strip()
    if not first.isdigit():
        raise DataError(f"{path} line 1: expected the image count, got {first!r}")
    rows = read_table(path, ("image_name", "item_id", "evaluation_status"), skip_lines=2)
    if len(rows) != int(first):
        raise DataError(f"{path}: line 1 announces {first} images but {len(rows)} rows follow")
    paths, items, status = [], [], []
    for r in rows:
        m = _ITEM.match(r.fields[1])
        if not m:
            raise DataError(f"{path} line {r.line}: item_id should look like 'id_00000001', got {r.fields[1]!r}")
        if r.fields[2] not in _STATUS:
            raise DataError(f"{path} line {r.line}: evaluation_status must be train, query or gallery, got {r.fields[2]!r}")
        paths.append(r.fields[0])
        items.append(int(m.group(1)))
        status.append(r.fields[2])
    items, status = np.asarray(items, dtype=np.int64), np.asarray(status)
    for s in _STATUS:
        if not (status == s).any():
            raise DataError(f"{path}: no '{s}' rows (expected train, query and gallery images)")

    def view(s: str, labels_fn, transform) -> ImageListDataset:
        idx = np.flatnonzero(status == s)
        return ImageListDataset([paths[i] for i in idx], labels_fn(items[idx]), root=root,
                                transform=transform, name=f"inshop/{s}")

    train = view("train", relabel, train_transform)
    query = view("query", lambda x: x, test_transform)
    gallery = view("gallery", lambda x: x, test_transform)
    return DataSplits(train=train, query=query, gallery=gallery,
                      train_class_ids=np.unique(items[status == "train"]).astype(np.int64))
