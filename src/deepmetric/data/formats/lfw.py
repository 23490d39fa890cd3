"""``lfw``: Labeled Faces in the Wild verification pairs (the images folder + ``pairs.txt``).

``pairs.txt`` starts with ``S N`` (``10 300`` officially: S sets of N matched then N mismatched
pairs; a single ``N`` means one set). A matched line is ``name i j`` (images ``i`` and ``j`` of one
person), a mismatched line ``name1 i name2 j``; image ``i`` of ``name`` is
``<root>/<name>/<name>_<i:04d>.jpg``. Any header consistent with the file is accepted, so a small
``2 3`` file works for tests.

Returns ``DataSplits(train=None, pairs=VerificationPairs(...))``: ``images`` holds each distinct
image once (labels = person index in sorted name order, ``test_transform`` applied); ``fold`` is the
set index (the official 10 folds). Every image is checked up front; a missing one is named.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from ..base import DataError, DataSplits, VerificationPairs
from ..io import ImageListDataset, read_rows, require_root, to_int

_EXPECTED = "the LFW images folder (<name>/<name>_0001.jpg) with pairs.txt in it or beside it"


def _find_pairs(root: str, pairs: str) -> str:
    candidates = [pairs] if os.path.isabs(pairs) else [os.path.join(root, pairs), os.path.join(os.path.dirname(os.path.abspath(root)), pairs)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise DataError(f"LFW root {root}: missing {pairs} (looked for {' and '.join(candidates)}; expected {_EXPECTED})")


def parse_pairs(path: str) -> tuple[list[tuple[str, int, str, int]], np.ndarray, np.ndarray, list[int]]:
    """``(name1, i, name2, j)`` per pair, ``is_same``, ``fold``, and each pair's line number."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: empty file, expected a header 'S N' (sets, pairs per type) then the pairs")
    head_line, head = rows[0].line, rows[0].fields
    if len(head) not in (1, 2) or not all(h.isdigit() for h in head):
        raise DataError(f"{path} line {head_line}: expected a header 'S N' (e.g. '10 300'), got {' '.join(head)!r}")
    n_sets, n_per = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    body = rows[1:]
    if len(body) != 2 * n_sets * n_per:
        raise DataError(f"{path}: header '{' '.join(head)}' announces {2 * n_sets * n_per} pairs "
                        f"({n_sets} sets x {n_per} matched + {n_per} mismatched) but {len(body)} lines follow")
    pairs, same, fold, lines = [], [], [], []
    for k, (line, f) in enumerate((r.line, r.fields) for r in body):
        s, pos = divmod(k, 2 * n_per)
        matched = pos < n_per
        if matched and len(f) != 3:
            raise DataError(f"{path} line {line}: expected a matched pair 'name i j' (set {s + 1}), got {len(f)} fields")
        if not matched and len(f) != 4:
            raise DataError(f"{path} line {line}: expected a mismatched pair 'name1 i name2 j' (set {s + 1}), got {len(f)} fields")
        if matched:
            pairs.append((f[0], to_int(f[1], path, line, "i"), f[0], to_int(f[2], path, line, "j")))
        else:
            pairs.append((f[0], to_int(f[1], path, line, "i"), f[2], to_int(f[3], path, line, "j")))
        same.append(matched)
        fold.append(s)
        lines.append(line)
    return pairs, np.asarray(same, dtype=bool), np.asarray(fold, dtype=np.int64), lines


def build_lfw(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    pairs: str = "pairs.txt",
) -> DataSplits:
    """LFW pairs from ``root`` (the images folder, or the folder holding ``lfw/`` and ``pairs.txt``).
    ``train_transform`` is accepted for the common signature and unused (evaluation only)."""
    del train_transform
    root = require_root(root, "lfw", _EXPECTED)
    if os.path.isdir(os.path.join(root, "lfw")) and os.path.isfile(os.path.join(root, pairs)):
        root = os.path.join(root, "lfw")
    pairs_path = _find_pairs(root, pairs)
    pair_list, is_same, fold, lines = parse_pairs(pairs_path)

    index: dict[str, int] = {}
    image_paths, image_names = [], []
    left, right = np.empty(len(pair_list), np.int64), np.empty(len(pair_list), np.int64)
    for k, (n1, i, n2, j) in enumerate(pair_list):
        for side, (name, num) in ((left, (n1, i)), (right, (n2, j))):
            rel = os.path.join(name, f"{name}_{num:04d}.jpg")
            if rel not in index:
                if not os.path.isfile(os.path.join(root, rel)):
                    raise DataError(f"LFW root {root}: missing image {rel} (named by {pairs_path} line {lines[k]})")
                index[rel] = len(image_paths)
                image_paths.append(rel)
                image_names.append(name)
            side[k] = index[rel]
    people = sorted(set(image_names))
    person = {p: c for c, p in enumerate(people)}
    images = ImageListDataset(image_paths, [person[n] for n in image_names], root=root,
                              transform=test_transform, name="lfw/images")
    verification = VerificationPairs(images=images, left=left, right=right, is_same=is_same, fold=fold)
    return DataSplits(train=None, pairs=verification)
