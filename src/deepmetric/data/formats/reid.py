"""``market1501`` and ``dukemtmc``: person re-identification folders.

Layout: ``bounding_box_train/``, ``bounding_box_test/`` (the gallery) and ``query/``, with the
person id and camera parsed from each file name by ``([-\\d]+)_c(\\d)`` (``0002_c1s1_000451_03.jpg``,
``0005_c2_f0046985.jpg``). As in the reference loaders (torchreid, centroids-reid): junk images
(pid -1) are dropped everywhere, distractors (pid 0) stay in the gallery, camera ids become
0-based (``camid -= 1``), and training pids are relabelled to ``0..C-1``. Query and gallery keep
the raw pids so they match each other. Retrieval is query/gallery with the re-ID rule that
same-pid same-camera gallery items are excluded (applied by the evaluator from ``camids``).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional

import numpy as np

from ..base import DataError, DataSplits, relabel
from ..io import ImageListDataset, descend, require_root

_PATTERN = re.compile(r"([-\d]+)_c(\d)")
_FOLDERS = ("bounding_box_train", "bounding_box_test", "query")
_EXTENSIONS = (".jpg", ".jpeg", ".png")


def parse_reid_folder(root: str, folder: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Relative paths, pids and 0-based camera ids of one folder; junk (pid -1) dropped.

    Raises :class:`DataError` naming a file whose name does not match ``<pid>_c<cam>``.
    """
    path = os.path.join(root, folder)
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(_EXTENSIONS) and not n.startswith("."))
    paths, pids, cams = [], [], []
    for n in names:
        m = _PATTERN.search(n)
        if m is None or int(m.group(2)) < 1:
            raise DataError(f"{os.path.join(path, n)}: file name does not match '<pid>_c<camera>' "
                            "(e.g. 0002_c1s1_000451_03.jpg, cameras numbered from 1)")
        pid = int(m.group(1))
        if pid == -1:
            continue
        paths.append(os.path.join(folder, n))
        pids.append(pid)
        cams.append(int(m.group(2)) - 1)
    return paths, np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64)


def build_reid_folders(root, fmt, archive_dirs, train_transform, test_transform) -> DataSplits:
    expected = f"the {fmt} folder with {', '.join(f + '/' for f in _FOLDERS)}"
    root = require_root(root, fmt, expected)
    root = descend(root, "bounding_box_train", archive_dirs)
    for folder in _FOLDERS:
        if not os.path.isdir(os.path.join(root, folder)):
            raise DataError(f"{fmt} root {root}: missing {folder}/ (expected {expected})")
    parts = {}
    for folder in _FOLDERS:
        paths, pids, cams = parse_reid_folder(root, folder)
        if not paths:
            raise DataError(f"{fmt} folder {os.path.join(root, folder)}: no images named '<pid>_c<camera>...jpg'")
        parts[folder] = (paths, pids, cams)
    tr_paths, tr_pids, tr_cams = parts["bounding_box_train"]
    train = ImageListDataset(tr_paths, relabel(tr_pids), tr_cams, root=root, transform=train_transform, name=f"{fmt}/train")
    query = ImageListDataset(*parts["query"], root=root, transform=test_transform, name=f"{fmt}/query")
    gallery = ImageListDataset(*parts["bounding_box_test"], root=root, transform=test_transform, name=f"{fmt}/gallery")
    return DataSplits(train=train, query=query, gallery=gallery,
                      train_class_ids=np.unique(tr_pids).astype(np.int64))


def build_market1501(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
) -> DataSplits:
    return build_reid_folders(root, "market1501", ("Market-1501-v15.09.15", "Market-1501", "market1501"),
                              train_transform, test_transform)


def build_dukemtmc(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
) -> DataSplits:
    return build_reid_folders(root, "dukemtmc", ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmc"),
                              train_transform, test_transform)
