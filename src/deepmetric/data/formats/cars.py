"""``cars``: Cars196 (Stanford Cars) for zero-shot retrieval, from ``cars_annos.mat``.

``cars_annos.mat`` holds a ``(1, N)`` struct array ``annotations`` with fields
``relative_im_path`` (``car_ims/000001.jpg``), ``bbox_x1..bbox_y2``, ``class`` (1..196) and
``test`` (the classification split, not used here). Protocol: classes 1-98 train, 99-196 test with
leave-one-out retrieval; in general the first ``num_train_classes`` (default half). Train labels
relabelled to ``0..C-1``; test labels keep the class id. Images are used uncropped (as in the DML
literature), the boxes are ignored.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..base import DataError, DataSplits
from ..io import require_in, require_root
from .cub import first_classes_split, retrieval_splits

_EXPECTED = "the Cars196 folder with cars_annos.mat and car_ims/"


def read_cars_annos(path: str) -> tuple[list[str], np.ndarray]:
    """Image paths and class ids from ``cars_annos.mat`` (fields read by name, not position)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a non-MAT or truncated file
        raise DataError(f"{path}: not a readable MATLAB file ({e})") from None
    ann = mat.get("annotations")
    names = () if ann is None or ann.dtype.names is None else ann.dtype.names
    missing = [f for f in ("relative_im_path", "class") if f not in names]
    if missing:
        raise DataError(f"{path}: expected a struct array 'annotations' with fields relative_im_path and class "
                        f"(missing {', '.join(missing)}; found variables {', '.join(k for k in mat if not k.startswith('__'))})")
    ann = ann.ravel()
    paths = [str(np.asarray(a).ravel()[0]) for a in ann["relative_im_path"]]
    labels = np.array([int(np.asarray(a).ravel()[0]) for a in ann["class"]], dtype=np.int64)
    return paths, labels


def build_cars(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    num_train_classes: Optional[int] = None,
) -> DataSplits:
    root = require_root(root, "cars", _EXPECTED)
    paths, labels = read_cars_annos(require_in(root, "cars_annos.mat", "Cars196", _EXPECTED))
    if not paths:
        raise DataError(f"Cars196 root {root}: cars_annos.mat lists no images")
    mask = first_classes_split(labels, num_train_classes, "cars")
    return retrieval_splits(paths, labels, root, mask, "cars", train_transform, test_transform)
