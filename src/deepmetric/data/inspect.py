"""Look at a user's images before choosing how to train on them: :func:`inspect_data`.

``deepmetric train my_images/`` starts here. A :class:`DataProfile` says what the data is (the
format that reads it, the classes and their image counts, image sizes, grey or colour) and what is
wrong with it (unreadable files, classes with one image), so that
:func:`deepmetric.engine.auto.auto_config` can write a recipe for it and say why.

Every file is opened (threads; decoding releases the GIL), up to ``max_checked`` of them; above that,
a spread sample is (the rest are then checked by the loader as training reads them). Sizes and
colour come from the same pass: an image is grey when all three of its decoded channels are equal.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.images import IMAGE_EXTENSIONS, ImageError, load_image_file
from .base import DataError
from .io import find_images

#: list files that ``deepmetric train`` takes as data: CSV (a header naming path and label columns)
#: and text lists (``path label`` per line)
LIST_SUFFIXES = (".csv", ".txt", ".lst", ".list")


@dataclass
class DataProfile:
    """What :func:`inspect_data` found. ``paths`` are as the format names them (relative to
    ``root``), ``labels`` index ``class_names``; unreadable files are listed and left out of both."""

    source: str
    format: str                     # image_folder, csv or list
    root: str                       # data.root for that format
    options: Dict[str, object]      # data.options for that format (``exclude``: the unreadable files)
    class_names: List[str]
    #: how the recipe's class lists name each class (``data.train_classes``): folder or label names,
    #: or the integer ids of a list whose labels are all integers
    class_keys: List[object]
    paths: List[str]
    labels: np.ndarray
    #: ``(n, 2)`` width and height of the images opened
    sizes: np.ndarray
    #: how many of the images opened are grey (all channels equal)
    grey: int
    checked: int
    unreadable: List[Tuple[str, str]] = field(default_factory=list)
    #: images lying directly in a folder's root (no class): left out
    loose: int = 0

    @property
    def counts(self) -> np.ndarray:
        """Images per class, ``(C,)``."""
        return np.bincount(self.labels, minlength=len(self.class_names))

    @property
    def median_side(self) -> float:
        return float(np.median(self.sizes.max(axis=1))) if len(self.sizes) else 0.0

    @property
    def is_grey(self) -> bool:
        """Most images opened are grey (then the model takes one channel)."""
        return self.checked > 0 and self.grey >= 0.9 * self.checked


def inspect_data(source: str | os.PathLike, max_checked: int = 20000, workers: int = 8) -> DataProfile:
    """Inspect an image folder (one subfolder per class) or a list file (``.csv`` with ``path`` and
    ``label`` columns, or a text file of ``path label`` lines).

    Raises:
        DataError: no such path, no images, no classes, or fewer than 4 classes with two images
            (the zero-shot protocol trains on some classes and tests on unseen others); one line
            naming the path.
    """
    src = Path(os.path.abspath(os.path.expanduser(os.fspath(source))))
    if src.is_dir():
        names, rel, labels = find_images(str(src))
        loose = int((labels < 0).sum())
        if not rel:
            raise DataError(f"{src}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)} in it and below)")
        if not names:
            raise DataError(f"{src}: {loose} images but no class subfolders; put the images of each class "
                            f"(a product, a person, a species) in a subfolder of its own")
        keep = labels >= 0
        rel, labels = [p for p, k in zip(rel, keep) if k], labels[keep]
        profile = _profile(str(src), "image_folder", str(src), {}, names, rel, labels, loose)
    elif src.is_file():
        profile = _from_list(src)
    else:
        raise DataError(f"{src}: no such folder or list file (expected a folder with one subfolder of images "
                        f"per class, or a .csv/.txt list of 'path label')")
    _check(profile, max_checked, workers)
    return profile


def _profile(source, fmt, root, options, names, paths, labels, loose=0, keys=None) -> DataProfile:
    return DataProfile(source, fmt, root, dict(options), [str(n) for n in names], list(names if keys is None else keys),
                       list(paths), np.asarray(labels, dtype=np.int64), np.zeros((0, 2), np.int64), 0, 0, loose=loose)


def _from_list(src: Path) -> DataProfile:
    """A CSV (``csv`` format) or a text list (``list`` format): paths relative to the list's folder."""
    from .io import read_csv, read_rows

    if src.suffix.lower() not in LIST_SUFFIXES:
        raise DataError(f"{src}: not an image folder or a list file (expected a folder, or a list ending in "
                        f"{', '.join(LIST_SUFFIXES)})")
    if src.suffix.lower() == ".csv":
        rows = [(r["path"], r["label"]) for _, r in read_csv(src, ["path", "label"])]
        fmt = "csv"
    else:
        rows = []
        for row in read_rows(src):
            if row.fields[0].startswith("#"):
                continue
            if len(row.fields) < 2:
                raise DataError(f"{src} line {row.line}: expected 'path label', got {' '.join(row.fields)!r}")
            rows.append((" ".join(row.fields[:-1]), row.fields[-1]))
        fmt = "list"
    if not rows:
        raise DataError(f"{src}: the list names no images")
    from .formats.csv_list import labels_of

    raw, names = labels_of([lab for _, lab in rows])
    keys, labels = np.unique(raw, return_inverse=True)  # the format's class ids, and each row's index
    keys = keys.tolist()
    return _profile(str(src), fmt, str(src), {}, [names[k] for k in keys] if names else keys,
                    [p for p, _ in rows], labels, keys=None if names else keys)


def _check(profile: DataProfile, max_checked: int, workers: int) -> None:
    """Open the images (all, or a spread sample above ``max_checked``): sizes, grey, unreadable ones;
    then refuse data the zero-shot protocol cannot use."""
    n = len(profile.paths)
    base = os.path.dirname(profile.root) if os.path.isfile(profile.root) else profile.root
    order = np.arange(n) if n <= max_checked else np.linspace(0, n - 1, max_checked).astype(np.int64)

    def probe(i: int):
        path = os.path.join(base, profile.paths[i])
        try:
            img = load_image_file(path)
        except ImageError as e:
            message = str(e)
            return i, None, message.split(": ", 1)[-1] if message.startswith("image ") else message
        arr = np.asarray(img)
        grey = bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
        return i, (img.size, grey), None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(probe, order.tolist()))
    bad = {i: why for i, _, why in results if why is not None}
    good = [r for _, r, why in results if why is None]
    profile.sizes = np.asarray([s for s, _ in good], dtype=np.int64).reshape(-1, 2)
    profile.grey = sum(g for _, g in good)
    profile.checked = len(good)
    if bad:
        profile.unreadable = [(profile.paths[i], why) for i, why in sorted(bad.items())]
        keep = np.asarray([i not in bad for i in range(n)])
        profile.options["exclude"] = [profile.paths[i] for i in sorted(bad)]
        profile.paths = [p for p, k in zip(profile.paths, keep) if k]
        profile.labels = profile.labels[keep]
        if not profile.paths:
            raise DataError(f"{profile.source}: none of its {n} images can be read "
                            f"(first: {profile.unreadable[0][0]}: {profile.unreadable[0][1]})")
    counts = profile.counts
    usable = int((counts >= 2).sum())
    if len(profile.class_names) < 2:
        raise DataError(f"{profile.source}: one class ({profile.class_names[0]!r}); metric learning learns what "
                        f"tells classes apart: give at least 4 classes (a subfolder per class)")
    if usable < 4:
        raise DataError(f"{profile.source}: {usable} classes have two or more images; the zero-shot protocol "
                        f"needs at least 4 (2 to train on, 2 unseen to test on)")


def describe_profile(profile: DataProfile) -> str:
    """One line: ``1,100 classes, 7,012 images (median 6 per class), colour, median side 72 px``."""
    counts = profile.counts
    colour = "greyscale" if profile.is_grey else "colour"
    return (f"{len(profile.class_names):,} classes, {len(profile.paths):,} images (median "
            f"{float(np.median(counts)):g} per class), {colour}, median side {profile.median_side:g} px")


def mixed(profile: DataProfile) -> Optional[str]:
    """A note when the images differ in size or colour, else None."""
    notes = []
    if len(profile.sizes):
        sides = profile.sizes.max(axis=1)
        if sides.min() != sides.max():
            notes.append(f"sizes {int(sides.min())}-{int(sides.max())} px")
    if 0 < profile.grey < profile.checked:
        notes.append(f"{profile.grey} of {profile.checked} grey, the rest colour")
    return "; ".join(notes) or None
