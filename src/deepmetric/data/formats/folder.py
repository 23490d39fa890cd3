"""One folder per class: ``image_folder`` (train + retrieval test) and ``identity_folder`` (train only).

Labels are the index of the class folder in sorted name order (``splits.class_names`` maps them
back). The training view is relabelled to ``0..C_train-1`` (``splits.train_class_ids`` maps a
training label back to its folder index); the test view keeps the folder-index labels, so they
identify classes across runs.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

from ..base import DataError, DataSplits, MetricDataset, relabel
from ..io import IMAGE_EXTENSIONS, ImageListDataset, find_images, require_root

_EXPECTED = "a folder with one subfolder of images per class"


def scan_class_folders(
    root: str, extensions: Sequence[str], fmt: str
) -> tuple[list[str], list[str], np.ndarray]:
    """Class names (sorted subfolders), image paths relative to ``root``, and folder-index labels
    (:func:`~deepmetric.data.io.find_images`, images lying directly in ``root`` left out).

    Raises :class:`DataError` for a root with no class folder or a class folder with no image.
    """
    names, paths, labels = find_images(root, extensions)
    loose = int((labels < 0).sum())
    if not names:
        hint = f"; found {loose} images directly in it: move them into one subfolder per class" if loose else ""
        raise DataError(f"{fmt} root {root}: no class subfolders (expected {_EXPECTED}){hint}")
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    if (counts == 0).any():
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        raise DataError(
            f"{fmt} class folder {os.path.join(root, names[int(np.argmin(counts))])}: no images with extensions "
            f"{' '.join(exts)} (remove the empty folder or add images)"
        )
    keep = labels >= 0
    return names, [p for p, k in zip(paths, keep) if k], labels[keep]


def without(paths: Sequence[str], labels: np.ndarray, exclude: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``paths`` and ``labels`` without the paths in ``exclude`` (compared as normalised paths)."""
    if not exclude:
        return list(paths), labels
    gone = {os.path.normpath(p) for p in exclude}
    keep = np.asarray([os.path.normpath(p) not in gone for p in paths], dtype=bool)
    return [p for p, k in zip(paths, keep) if k], np.asarray(labels)[keep]


def all_classes_splits(base: MetricDataset, class_names: Optional[list[str]], train_transform: Optional[Callable],
                       test_transform: Optional[Callable]) -> DataSplits:
    """One pool for ``image_folder`` and ``csv``: every class trains and is queried leave-one-out.

    Split it with ``data.train_classes`` / ``data.test_classes`` (folder names or ids) for the
    zero-shot protocol (:func:`deepmetric.data.protocol.split_classes`).
    """
    ids, labels = np.unique(base.labels, return_inverse=True)
    train = base.with_transform(train_transform)
    train.labels = labels.astype(np.int64)
    query = base.with_transform(test_transform)
    train.name, query.name = f"{base.name}/train", f"{base.name}/query"
    names = None if class_names is None else dict(enumerate(class_names))
    return DataSplits(train=train, query=query, gallery=None, train_class_ids=ids, class_names=names)


def build_image_folder(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    exclude: Sequence[str] = (),
) -> DataSplits:
    """A folder per class, labelled by the folder's index in sorted name order. Every class trains
    and is queried leave-one-out (a sanity check); split the classes with ``data.train_classes``
    (folder names, or a fraction: the first fraction of the sorted folders trains) for zero-shot
    retrieval on the unseen rest. ``exclude``: image paths (relative to ``root``) left out, such as
    the unreadable files ``deepmetric train DIR`` found."""
    root = require_root(root, "image_folder", _EXPECTED)
    names, paths, labels = scan_class_folders(root, extensions, "image_folder")
    paths, labels = without(paths, labels, exclude)
    base = ImageListDataset(paths, labels, root=root, name="image_folder")
    return all_classes_splits(base, names, train_transform, test_transform)


def build_identity_folder(
    root: Optional[str],
    *,
    train_transform: Optional[Callable] = None,
    test_transform: Optional[Callable] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    min_images: int = 1,
) -> DataSplits:
    """MS-Celeb style: one folder per identity, training only (evaluate with e.g. ``lfw``).

    ``min_images`` drops identities with fewer images (``splits.class_names`` keeps every folder,
    ``splits.train_class_ids`` the ones kept).
    ``test_transform`` is accepted for the common builder signature and unused.
    """
    del test_transform
    root = require_root(root, "identity_folder", "a folder with one subfolder of images per identity")
    names, paths, labels = scan_class_folders(root, extensions, "identity_folder")
    counts = np.bincount(labels, minlength=len(names))
    keep_ids = np.flatnonzero(counts >= int(min_images))
    if len(keep_ids) == 0:
        raise DataError(f"identity_folder root {root}: no identity has at least min_images={min_images} images")
    keep = np.isin(labels, keep_ids)
    train = ImageListDataset(
        [p for p, k in zip(paths, keep) if k], relabel(labels[keep]), root=root,
        transform=train_transform, name="identity_folder/train",
    )
    return DataSplits(train=train, train_class_ids=keep_ids.astype(np.int64),
                      class_names=dict(enumerate(names)))
