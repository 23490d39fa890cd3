"""Characters rendered from real typefaces: a class is a character, an instance a typeface.

The quickstart's data (the 16 text faces matplotlib ships: DejaVu Sans, Sans Mono and Serif and STIX
General, each in four styles) and the many-class benchmark's (CJK faces from Debian's font packages)
are made here. Rendering is deterministic: the same fonts and characters give the same pixels.

Each glyph is drawn white on black, centred on the face's em box (PIL's ``mm`` anchor: the middle of
the advance and of the ascender-descender span), so a glyph keeps its size and height relative to
the others: ``o`` and ``O`` stay apart.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

#: matplotlib's text faces (its other files are math symbols, display sizes and TeX fonts)
MATPLOTLIB_TEXT_FACES = tuple(
    f"{family}{style}.ttf"
    for family, styles in (
        ("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
        ("STIXGeneral", ("", "Bol", "Italic", "BolIta")),
    )
    for style in styles
)


def matplotlib_faces() -> List[Path]:
    """Paths of the 16 text faces in matplotlib's ``mpl-data/fonts/ttf``."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [folder / name for name in MATPLOTLIB_TEXT_FACES]


def font_characters(path: str | os.PathLike) -> set[int]:
    """The code points a font file maps to a glyph (its character map)."""
    from matplotlib.ft2font import FT2Font

    return set(FT2Font(str(path)).get_charmap())


def shared_characters(fonts: Sequence[str | os.PathLike], categories: str = "LNPS",
                      base_only: bool = True) -> List[int]:
    """Code points every font maps, in order, restricted to visible characters.

    ``categories``: first letters of the Unicode general categories kept (letters, numbers,
    punctuation, symbols). ``base_only`` drops characters that decompose into a base and combining
    marks (``é``, ``Ǻ``): at small sizes they differ from their base letter by a few pixels.
    """
    common = set.intersection(*(font_characters(f) for f in fonts))
    keep = []
    for c in sorted(common):
        ch = chr(c)
        if unicodedata.category(ch)[0] not in categories:
            continue
        if base_only and len(unicodedata.normalize("NFD", ch)) > 1:
            continue
        keep.append(c)
    return keep


def render_glyphs(fonts: Sequence[str | os.PathLike], chars: Sequence[int], size: int = 32,
                  font_size: Optional[int] = None) -> np.ndarray:
    """``(len(chars), len(fonts), size, size)`` uint8: each character drawn in each face.

    ``font_size`` (pixels per em) defaults to three quarters of ``size``.
    """
    from PIL import Image, ImageDraw, ImageFont

    font_size = int(font_size or round(size * 0.75))
    out = np.zeros((len(chars), len(fonts), size, size), dtype=np.uint8)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for j, path in enumerate(fonts):
        font = ImageFont.truetype(str(path), font_size)
        for i, c in enumerate(chars):
            draw.rectangle((0, 0, size, size), fill=0)
            draw.text((size / 2, size / 2), chr(c), fill=255, font=font, anchor="mm")
            out[i, j] = np.asarray(canvas)
    return out


def distinct_glyphs(images: np.ndarray, threshold: float = 0.005) -> np.ndarray:
    """Indices of the characters to keep so that no two look alike in every face.

    ``images``: ``(C, F, H, W)`` uint8 from :func:`render_glyphs`. Two characters look alike when
    the mean absolute difference of their renders, over all faces and pixels, is below
    ``threshold`` (on a 0-1 scale): Latin ``A``, Greek ``Α`` and Cyrillic ``А`` are one glyph in
    every face. The first of each group (in the given order) is kept. Characters blank in some face
    are dropped too.
    """
    import torch

    flat = torch.from_numpy(images.reshape(len(images), -1)).float().div_(255.0)
    blank = images.reshape(images.shape[0], images.shape[1], -1).max(-1).min(-1) == 0
    dist = torch.cdist(flat, flat, p=1).div_(flat.shape[1])
    kept: List[int] = []
    for i in range(len(images)):
        if blank[i]:
            continue
        if not kept or bool((dist[i, kept] >= threshold).all()):
            kept.append(i)
    return np.asarray(kept, dtype=np.int64)


def character_names(chars: Iterable[int]) -> List[str]:
    """``'A'`` for printable characters, with the code point: ``'U+0041 A'``."""
    return [f"U+{c:04X} {chr(c)}" for c in chars]


def write_glyph_folder(out: str | os.PathLike, size: int = 32, fonts: Optional[Sequence[str | os.PathLike]] = None) -> Path:
    """The quickstart's glyphs as an image folder: ``OUT/U+XXXX/<face>.png`` (a class per character,
    an image per face, greyscale ``size x size``), the characters the ``glyphs`` format keeps; what
    ``deepmetric train OUT`` reads like any folder of your own images."""
    from PIL import Image

    faces = [Path(f) for f in (fonts or matplotlib_faces())]
    chars = shared_characters(faces)
    images = render_glyphs(faces, chars, size=size)
    keep = distinct_glyphs(images)
    out = Path(out)
    for i in keep:
        folder = out / f"U+{chars[i]:04X}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, face in enumerate(faces):
            Image.fromarray(images[i, j]).save(folder / f"{face.stem}.png")
    return out
