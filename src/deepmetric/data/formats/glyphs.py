"""``glyphs``: characters rendered from real typefaces, a class per character, an image per face.

With no ``root`` the faces are the 16 text faces matplotlib ships (DejaVu Sans, Sans Mono, Serif and
STIX General in four styles each), so the data comes with ``pip install``: the quickstart's. A
``root`` folder of font files (``.ttf``, ``.otf``, ``.ttc``; sorted by name) renders those faces
instead. The characters are the visible ones every face maps, without accented variants and with
one of each group of look-alikes (Latin ``A``, Greek ``Α`` and Cyrillic ``А`` draw the same glyph):
see :mod:`deepmetric.data.glyphs`. Labels are the character's place in code-point order, class
names ``'U+0041 A'``, and the camera id of an image is its face's index.

One pool, as an image folder: split the characters with ``data.train_classes``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ...core.errors import ParameterError
from ..base import DataError, DataSplits
from ..glyphs import character_names, distinct_glyphs, matplotlib_faces, render_glyphs, shared_characters
from .arrays import ArrayDataset

FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")


def _faces(root: Optional[str]) -> list[Path]:
    if root is None:
        return matplotlib_faces()
    folder = Path(os.path.expanduser(root))
    if not folder.is_dir():
        raise DataError(f"glyphs root {folder}: not a folder (expected a folder of font files, or no root "
                        f"for matplotlib's faces)")
    faces = sorted(p for p in folder.iterdir() if p.suffix.lower() in FONT_EXTENSIONS)
    if len(faces) < 2:
        raise DataError(f"glyphs root {folder}: {len(faces)} font files ({', '.join(FONT_EXTENSIONS)}); "
                        f"need >= 2 faces, one image per face and character")
    return faces


def build_glyphs(root: Optional[str] = None, *, train_transform: Optional[Callable] = None,
                 test_transform: Optional[Callable] = None, size: int = 32, font_size: Optional[int] = None,
                 lookalike_threshold: float = 0.005) -> DataSplits:
    """Render every shared character in every face at ``size x size`` (``font_size`` pixels per em,
    default three quarters of ``size``); characters alike within ``lookalike_threshold`` (mean
    absolute difference on a 0-1 scale) in every face are kept once."""
    if not 8 <= int(size) <= 256:
        raise ParameterError(f"{{size}} must be in 8..256 pixels, got {size}", "size")
    faces = _faces(root)
    try:
        chars = shared_characters(faces)
    except (OSError, RuntimeError) as e:
        raise DataError(f"glyphs root {root}: cannot read a font ({e})") from None
    if len(chars) < 4:
        raise DataError(f"glyphs: the {len(faces)} faces share {len(chars)} visible characters; need >= 4")
    images = render_glyphs(faces, chars, size=int(size), font_size=font_size)
    keep = distinct_glyphs(images, lookalike_threshold)
    images, chars = images[keep], [chars[i] for i in keep]
    n_chars, n_faces = images.shape[:2]
    flat = images.reshape(n_chars * n_faces, size, size)
    labels = np.repeat(np.arange(n_chars, dtype=np.int64), n_faces)
    faces_of = np.tile(np.arange(n_faces, dtype=np.int64), n_chars)
    names = character_names(chars)
    return DataSplits(train=ArrayDataset(flat, labels, train_transform, "glyphs-train", names, camids=faces_of),
                      query=ArrayDataset(flat, labels, test_transform, "glyphs-test", names, camids=faces_of),
                      class_names=dict(enumerate(names)))
