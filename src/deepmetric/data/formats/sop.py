"""``sop``: Stanford Online Products, in the Ebay list format or PaddleClas's list format.

- ``ebay`` (``Ebay_train.txt``/``Ebay_test.txt``, header ``image_id class_id super_class_id path``,
  the Paddle metric_learning reader): train label = ``class_id - 1`` (relabelled to 0..11317, which
  is the same thing on the official lists); test label = the raw ``class_id`` (11319...22634).
- ``paddleclas`` (``train_list.txt``/``test_list.txt``, ``path label unique_id``, space-separated):
  train labels relabelled to ``0..C-1``; test labels kept. The ``unique_id`` column only served
  PaddleClas's self-match exclusion; our leave-one-out excludes each query by index, which is the
  same rule, so it is checked to be an integer and otherwise unused.

Test retrieval is leave-one-out on the test list (``gallery=None``). Paths are relative to the root.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from ...core.errors import ParameterError
from ..base import DataError, DataSplits, relabel
from ..io import ImageListDataset, descend, read_table, require_root, to_int

_FILES = {"ebay": ("Ebay_train.txt", "Ebay_test.txt"), "paddleclas": ("train_list.txt", "test_list.txt")}
_EXPECTED = {
    "ebay": "the Stanford_Online_Products folder with Ebay_train.txt and Ebay_test.txt",
    "paddleclas": "the PaddleClas SOP folder with train_list.txt and test_list.txt",
}


def _read_ebay(path: str) -> tuple[list[str], np.ndarray]:
    cols = ("image_id", "class_id", "super_class_id", "path")
    rows = read_table(path, cols, header_if=lambda f: f[0] == "image_id", last_column_may_contain_sep=True)
    for r in rows:
        to_int(r.fields[0], path, r.line, "image_id")
        to_int(r.fields[2], path, r.line, "super_class_id")
    return [r.fields[3] for r in rows], np.array([to_int(r.fields[1], path, r.line, "class_id") for r in rows], dtype=np.int64)


def _read_paddleclas(path: str) -> tuple[list[str], np.ndarray]:
    rows = read_table(path, ("path", "label", "unique_id"))
    for r in rows:
        to_int(r.fields[2], path, r.line, "unique_id")
    return [r.fields[0] for r in rows], np.array([to_int(r.fields[1], path, r.line, "label") for r in rows], dtype=np.int64)


_READERS = {"ebay": _read_ebay, "paddleclas": _read_paddleclas}


def build_sop(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    list_format: str = "auto",
) -> DataSplits:
    """SOP from ``root``; ``list_format`` is ``"ebay"``, ``"paddleclas"`` or ``"auto"`` (Ebay lists
    if present, else PaddleClas lists)."""
    expected_any = f"{_EXPECTED['ebay']}, or {_EXPECTED['paddleclas']}"
    root = require_root(root, "sop", expected_any)
    root = descend(root, "Ebay_train.txt", ("Stanford_Online_Products",))
    if list_format == "auto":
        found = [f for f, (tr, _) in _FILES.items() if os.path.isfile(os.path.join(root, tr))]
        if not found:
            raise DataError(f"SOP root {root}: missing Ebay_train.txt (expected {expected_any})")
        list_format = found[0]
    if list_format not in _FILES:
        raise ParameterError(f"sop: {{list_format}} must be 'auto', 'ebay' or 'paddleclas', got {list_format!r}",
                             "list_format")
    splits = {}
    for which, name in zip(("train", "test"), _FILES[list_format]):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f"SOP root {root}: missing {name} (expected {_EXPECTED[list_format]})")
        paths, labels = _READERS[list_format](path)
        if not paths:
            raise DataError(f"{path}: no image rows")
        splits[which] = (paths, labels)
    (tr_paths, tr_labels), (te_paths, te_labels) = splits["train"], splits["test"]
    train = ImageListDataset(tr_paths, relabel(tr_labels), root=root, transform=train_transform, name="sop/train")
    query = ImageListDataset(te_paths, te_labels, root=root, transform=test_transform, name="sop/test")
    return DataSplits(train=train, query=query, gallery=None,
                      train_class_ids=np.unique(tr_labels).astype(np.int64))
