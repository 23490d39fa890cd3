"""``list``: a text file of ``path label`` lines (your own data, any layout).

Paths are relative to the list file's folder (or absolute) and may contain spaces: the label is the
last field. Blank lines and lines starting with ``#`` are skipped. Labels that are all integers are
class ids; otherwise they are class names, numbered in sorted order (``splits.class_names``), as in
the ``csv`` format. Every image trains and is queried leave-one-out; ``data.train_classes`` splits
the classes for the zero-shot protocol.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..base import DataError, DataSplits
from ..io import ImageListDataset, list_file, read_rows
from .csv_list import labels_of
from .folder import all_classes_splits, without


def build_list(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    file: str = "list.txt",
    exclude: Sequence[str] = (),
) -> DataSplits:
    """Read ``root/file`` (``root`` may also be the list file itself); paths in ``exclude`` are left out."""
    root, path = list_file(root, file, "list", "a text file of 'path label' lines")
    paths, raw = [], []
    for row in read_rows(path):
        if row.fields[0].startswith("#"):
            continue
        if len(row.fields) < 2:
            raise DataError(f"{path} line {row.line}: expected 'path label', got {' '.join(row.fields)!r}")
        paths.append(" ".join(row.fields[:-1]))
        raw.append(row.fields[-1])
    if not paths:
        raise DataError(f"{path}: the list names no images")
    labels, class_names = labels_of(raw)
    paths, labels = without(paths, labels, exclude)
    base = ImageListDataset(paths, labels, root=root, name="list")
    return all_classes_splits(base, class_names, train_transform, test_transform)
