"""A many-class retrieval benchmark built offline from real math fonts: a class is a Unicode math
symbol (an operator, an arrow, a letterlike or Greek letter, a styled letter of the Mathematical
Alphanumeric Symbols such as bold-italic A or script A), an instance one typeface that draws it.

Run by hand (as root it installs the fonts with apt-get first; about two minutes on one core):

    python benchmarks/make_math_benchmark.py --out /tmp/suite/math

and train on it through deepmetric's ordinary ``image_folder`` format (``data.root=/tmp/suite/math``,
greyscale, ``model.in_chans=1``). It is ``make_glyph_benchmark.py``'s pipeline (imported, not copied)
with other faces, other classes and another placement:

1. **Faces.** The regular upright faces of Debian's math and symbol font packages (:data:`PACKAGES`;
   ``--no-install`` uses what is installed, ``--fonts DIR`` any folder): not bold, light, italic,
   oblique or condensed, and not a size or alternate variant (TeX's display sizes, STIX's
   ``Size``/``Integrals``/``Variants`` faces, Latin Modern's optical sizes other than 10 pt) nor a
   second copy of a face (:data:`SAME_FACE`), since a bold or italic letter is another class here;
   a face maps at least ``--min-coverage`` of the code points. A face's *family* is its design:
   Computer Modern (Latin Modern, CMU, MathJax's TeX fonts, KaTeX), STIX (STIX and MathJax's STIX
   fonts), each TeX Gyre design, DejaVu, Noto, else the package.
2. **Classes.** The assigned code points of the math blocks (:data:`BLOCKS`: Greek letters used in
   mathematics, Letterlike Symbols, Arrows, Mathematical Operators, a selection of Miscellaneous
   Technical, Miscellaneous Mathematical Symbols A and B, Supplemental Arrows A and B, Supplemental
   Mathematical Operators, Mathematical Alphanumeric Symbols), less canonical singletons (OHM SIGN is
   GREEK CAPITAL LETTER OMEGA). Ordered by how many faces map them (then code point), the order the
   look-alike rule keeps the first of.
3. **Rendering.** Each code point in each face whose cmap maps it, white on black like the glyph
   builder, ``--size`` pixels square at ``--font-size`` pixels per em (3/4 of ``--size``), centred
   horizontally on its ink and vertically on the face's math axis (the centre of its minus sign,
   else of its plus or equals sign, else the MATH table's AxisHeight, else 1/4 em: operators sit on
   the axis, so a raised dot or a low line keep their place); a glyph that would cross the border
   is drawn smaller to fit (counted as "shrunk to fit"). Blank renders, FreeType failures and
   placeholders (one bitmap for three or more code points of a face) are dropped, as the glyph
   builder does.
4. **Duplicates and look-alikes.** As the glyph builder: per class, faces round-robin over families
   in an order drawn with ``--seed``, a render kept when it differs from every kept one by at least
   ``--instance-threshold``, at most ``--max-faces``, classes with fewer than ``--min-faces`` dropped;
   two classes that look alike in most faces that draw both (the median over those faces of the
   mean difference under ``--lookalike-threshold``) are kept once (screened on 12x12 thumbnails
   over all the faces each pair shares).
5. **Output.** ``OUT/U+XXXX/<face>.png`` (8-bit greyscale) and ``OUT/manifest.json``: the glyph
   builder's manifest plus each class's Unicode name and block, the packages and the faces left out
   and why.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_glyph_benchmark import (Face, build_benchmark, confirm_lookalikes, enumerate_faces,  # noqa: E402
                                  face_charmap, folder_fonts, install_packages, installed_packages,
                                  mean_abs_difference, package_fonts, write_image_folder)

#: Debian 12 packages with math or symbol faces (``apt-cache search``; fonts-libertinus, fonts-xits
#: and fonts-firamath are not in Debian 12 and are skipped where apt does not know them)
PACKAGES = (
    "fonts-stix", "fonts-lmodern", "fonts-texgyre-math", "fonts-oflb-asana-math", "fonts-mathjax",
    "fonts-katex", "fonts-noto-core", "fonts-dejavu-core", "fonts-dejavu-extra", "fonts-freefont-otf",
    "fonts-cmu", "fonts-symbola", "fonts-linuxlibertine", "fonts-opensymbol", "fonts-urw-base35",
    "fonts-libertinus", "fonts-xits", "fonts-firamath",
)

#: ``(block, code point ranges)``: the classes asked for (assigned code points only)
BLOCKS = (
    ("Greek", [(0x0391, 0x03A9), (0x03B1, 0x03C9), (0x03D0, 0x03D2), (0x03D5, 0x03D6), (0x03DC, 0x03DD),
               (0x03F0, 0x03F1), (0x03F4, 0x03F6)]),
    ("Letterlike Symbols", [(0x2100, 0x214F)]),
    ("Arrows", [(0x2190, 0x21FF)]),
    ("Mathematical Operators", [(0x2200, 0x22FF)]),
    # brackets, corners, frown/smile, diameter, over/under brackets: not APL nor the pieces of big delimiters
    ("Miscellaneous Technical", [(0x2300, 0x2300), (0x2305, 0x2306), (0x2308, 0x230B), (0x2310, 0x2310),
                                 (0x2319, 0x2319), (0x231C, 0x231F), (0x2322, 0x2323), (0x237C, 0x237C),
                                 (0x2394, 0x2394), (0x23B4, 0x23B6), (0x23DC, 0x23E7)]),
    ("Miscellaneous Mathematical Symbols-A", [(0x27C0, 0x27EF)]),
    ("Supplemental Arrows-A", [(0x27F0, 0x27FF)]),
    ("Supplemental Arrows-B", [(0x2900, 0x297F)]),
    ("Miscellaneous Mathematical Symbols-B", [(0x2980, 0x29FF)]),
    ("Supplemental Mathematical Operators", [(0x2A00, 0x2AFF)]),
    ("Mathematical Alphanumeric Symbols", [(0x1D400, 0x1D7FF)]),
)

#: file name (lower case) -> the file of the same face it is a copy of (another version, another name)
SAME_FACE = {"dejavumathtexgyre.ttf": "texgyredejavu-math.otf"}
#: file names (lower case) of faces that are not a regular upright text design: size and alternate
#: variants, Latin Modern's optical sizes other than 10 pt and its variant designs
VARIANT_FACE = re.compile(r"size(\d|one|two|three|four|five)|integrals|variants|nonunicode|"
                          r"^lm\w*?(5|6|7|8|9|12|17)-|^lm(roman|mono|sans)(caps|dunh|unsl|slant|demi|lt|prop|quot|"
                          r"demicond|ltcond|proplt)")


def math_code_points(blocks: Optional[Sequence[str]] = None) -> List[tuple[int, str]]:
    """``(code point, block)`` for every assigned code point of :data:`BLOCKS` (those named in
    ``blocks``, default all), less canonical singletons (a code point whose canonical decomposition
    is one other code point)."""
    unknown = set(blocks or ()) - {b for b, _ in BLOCKS}
    if unknown:
        raise SystemExit(f"no block {', '.join(sorted(unknown))}; the blocks are: {', '.join(b for b, _ in BLOCKS)}")
    out = []
    for block, ranges in BLOCKS:
        if blocks and block not in blocks:
            continue
        for lo, hi in ranges:
            for c in range(lo, hi + 1):
                ch = chr(c)
                if unicodedata.name(ch, None) is None or unicodedata.category(ch) == "Cn":
                    continue
                decomposition = unicodedata.decomposition(ch)
                if decomposition and not decomposition.startswith("<") and len(decomposition.split()) == 1:
                    continue
                out.append((c, block))
    return out


# -- faces ---------------------------------------------------------------------------------------------

def design_family(package: str, path: str) -> str:
    """A face's design (module docstring, 1)."""
    name = Path(path).name.lower()
    if re.match(r"(latinmodern|lm(roman|sans|mono)|mathjax_|katex_|cmu)", name):
        return "computer-modern"
    if name.startswith("stix"):
        return "stix"
    if name.startswith(("dejavu", "texgyredejavu")):
        return "dejavu"
    m = re.match(r"texgyre(\w+?)-math", name)
    if m:
        return f"texgyre-{m.group(1)}"
    if name.startswith("noto"):
        return "noto"
    return package.removeprefix("fonts-")


def face_style_problem(face: Face) -> Optional[str]:
    """Why a face is not a regular upright design (None: it is one): its OS/2 weight, width and
    italic/oblique bits, its name, and :data:`VARIANT_FACE`."""
    from fontTools.ttLib import TTFont

    if VARIANT_FACE.search(Path(face.path).name.lower()):
        return "size or alternate variant"
    try:
        font = TTFont(face.path, fontNumber=face.index, lazy=True)
        os2 = font["OS/2"] if "OS/2" in font else None
        style = " ".join(font["name"].getDebugName(i) or "" for i in (2, 4)).lower()
    except Exception:
        return "unreadable"
    if os2 is not None:
        if not 350 <= os2.usWeightClass <= 500:
            return f"weight {os2.usWeightClass}"
        if os2.fsSelection & (1 | 1 << 9):
            return "italic or oblique"
    # by name, not OS/2 width: Symbola says width class 4 and is not condensed
    if re.search(r"italic|oblique|slant|bold|light|condensed|narrow", style):
        return f"style: {style}"
    return None


def select_faces(faces: Sequence[Face], code_points: Sequence[int], min_coverage: int = 20
                 ) -> tuple[List[Face], Dict[str, str], Dict[str, int]]:
    """``(faces kept, {face slug: why left out}, {face slug: code points mapped})``."""
    wanted = set(code_points)
    files = {Path(f.path).name.lower() for f in faces}
    kept, left_out, coverage = [], {}, {}
    for f in faces:
        n = len(face_charmap(f) & wanted)
        coverage[f.slug] = n
        copy_of = SAME_FACE.get(Path(f.path).name.lower())
        why = (f"maps {n} of the code points (< {min_coverage})" if n < min_coverage
               else f"a copy of {copy_of}" if copy_of in files else face_style_problem(f))
        if why:
            left_out[f.slug] = why
        else:
            kept.append(f)
    return kept, left_out, coverage


# -- placement -----------------------------------------------------------------------------------------

def ink_box(font, ch: str) -> Optional[tuple[int, int, int, int]]:
    """``(left, top, right, bottom)`` of the pixels ``ch`` inks, relative to its origin on the
    baseline (y down), or None for a blank glyph. (``font.getbbox`` is not tight: its box reaches
    down to the baseline.)"""
    mask, (ox, oy) = font.getmask2(ch, mode="L", anchor="ls")
    box = mask.getbbox()
    return None if box is None else (ox + box[0], oy + box[1], ox + box[2], oy + box[3])


def axis_height(font, path: str, index: int = 0) -> float:
    """Pixels from the baseline up to the math axis (module docstring, 3)."""
    for ch in ("\u2212", "+", "="):
        if ord(ch) not in _cmap(path, index):
            continue
        try:
            box = ink_box(font, ch)
        except OSError:
            continue
        if box is not None:
            return -(box[1] + box[3]) / 2
    try:
        from fontTools.ttLib import TTFont

        tt = TTFont(path, fontNumber=index, lazy=True)
        return tt["MATH"].table.MathConstants.AxisHeight.Value / tt["head"].unitsPerEm * font.size
    except Exception:
        return font.size / 4


_CMAPS: Dict[tuple, set] = {}


def _cmap(path: str, index: int) -> set:
    if (path, index) not in _CMAPS:
        _CMAPS[(path, index)] = face_charmap(Face(path, index, "", ""))
    return _CMAPS[(path, index)]


def on_math_axis(font, size: int, margin: int = 1) -> Callable:
    """The placement of this builder, for ``render_face(placer=...)``: ``draw(canvas_draw, ch)``
    writes ``ch`` white, its ink centred horizontally and the face's math axis on the middle row;
    a glyph that would cross the border (less ``margin``) is drawn at the largest size that fits
    and ``"shrunk to fit"`` returned."""
    axis = axis_height(font, font.path, getattr(font, "index", 0))
    half = size / 2 - margin

    def measure(f, ch: str):
        left, top, right, bottom = ink_box(f, ch) or (0, 0, 0, 0)
        up = axis * f.size / font.size  # baseline to axis at this size
        return left, right, up, max((right - left) / 2, -(up + top), up + bottom)

    def draw(canvas_draw, ch: str) -> Optional[str]:
        f, note = font, None
        left, right, up, reach = measure(f, ch)
        for _ in range(4):
            if reach <= half or f.size <= 1:
                break
            f, note = font.font_variant(size=max(1, int(f.size * half / reach))), "shrunk to fit"
            left, right, up, reach = measure(f, ch)
        canvas_draw.text((size / 2 - (left + right) / 2, size / 2 + up), ch, fill=255, font=f, anchor="ls")
        return note

    return draw


# -- look-alikes ---------------------------------------------------------------------------------------

def lookalike_symbols(images: np.ndarray, covered: np.ndarray, threshold: float, screen: float = 0.05,
                      thumb: int = 12) -> Dict[int, int]:
    """Classes that look alike in most faces that draw both: ``{dropped index: kept index}``, the
    kept one earlier in the order given. The mean over shared faces of the thumbnails' difference
    screens the pairs (under ``screen``); the full renders decide: the median over the shared faces
    of their mean absolute difference under ``threshold`` (the median, not the glyph builder's mean:
    bold capital Alpha is bold capital A in most faces, a little different in a few).
    ``lookalike_characters``' signature, for ``build_benchmark(lookalikes=...)``."""
    n_faces, n, size = images.shape[0], images.shape[1], images.shape[2]
    k = max(1, size // thumb)
    t = size // k
    total = np.zeros((n, n), dtype=np.float64)
    count = np.zeros((n, n), dtype=np.int64)
    for f in range(n_faces):
        idx = np.flatnonzero(covered[f])
        if len(idx) < 2:
            continue
        small = images[f, idx, : t * k, : t * k].reshape(len(idx), t, k, t, k).mean((2, 4)).astype(np.uint8)
        total[np.ix_(idx, idx)] += mean_abs_difference(small, small)
        count[np.ix_(idx, idx)] += 1
    mean = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    return confirm_lookalikes(images, covered, mean < screen, threshold, statistic=np.median)


# -- the benchmark -------------------------------------------------------------------------------------

def symbol_order(faces: Sequence[Face], code_points: Sequence[tuple[int, str]]
                 ) -> tuple[List[tuple[int, str]], Counter]:
    """The code points by how many ``faces`` map them (most first), then code point; and the counts."""
    maps: Counter = Counter()
    for f in faces:
        maps.update(face_charmap(f))
    return sorted(code_points, key=lambda cb: (-maps[cb[0]], cb[0])), maps


def write_math_folder(bench, out: str | os.PathLike, blocks: Dict[int, str], mapped: Dict[int, int],
                      extra: Dict) -> Path:
    """The glyph builder's folder and manifest, plus each class's name, block and how many faces
    map it, and ``extra``."""
    out = write_image_folder(bench, out)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    for row in manifest["characters_detail"]:
        c = ord(row["char"])
        row.update(name=unicodedata.name(row["char"]), block=blocks[c], faces_mapping_it=mapped.get(c, 0))
        row.pop("frequency", None)
        row.pop("rank", None)
    manifest["classes"] = manifest["characters"]
    manifest["classes_per_block"] = dict(Counter(blocks[c] for c in bench.chars))
    manifest["rendering"] = ("white on black, greyscale; ink centred horizontally, the face's math axis on "
                             "the middle row; glyphs that would cross the border shrunk to fit")
    manifest.update(extra)
    path.write_text(json.dumps(manifest, ensure_ascii=False, indent=1))
    return out


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the image folder to write (e.g. /tmp/suite/math)")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--font-size", type=int, default=None, help="pixels per em (default 3/4 of --size)")
    ap.add_argument("--instance-threshold", type=float, default=0.02)
    ap.add_argument("--lookalike-threshold", type=float, default=0.005)
    ap.add_argument("--min-faces", type=int, default=4)
    ap.add_argument("--max-faces", type=int, default=12, help="renders kept per symbol at most (0: all)")
    ap.add_argument("--min-coverage", type=int, default=20, help="code points a face must map to be used")
    ap.add_argument("--seed", type=int, default=0, help="draws each symbol's faces (families in random order)")
    ap.add_argument("--blocks", nargs="+", help="only these blocks of BLOCKS (default all)")
    ap.add_argument("--fonts", help="a folder of font files instead of the Debian packages")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing packages")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(list(argv) if argv is not None else None)
    t0 = time.perf_counter()
    extra: Dict = {}
    if args.fonts:
        files = folder_fonts(args.fonts, family=design_family)
    else:
        if not args.no_install:
            install_packages(PACKAGES)
        files = package_fonts(PACKAGES, family=design_family)
        have = installed_packages(PACKAGES)
        extra.update(packages_asked=list(PACKAGES), packages_installed=have,
                     packages_missing=[p for p in PACKAGES if p not in have])
    code_points = math_code_points(args.blocks)
    faces, left_out, coverage = select_faces(enumerate_faces(files), [c for c, _ in code_points], args.min_coverage)
    if len(faces) < args.min_faces:
        raise SystemExit(f"fewer than {args.min_faces} math faces found: install the packages (drop --no-install) "
                         "or give --fonts")
    ordered, mapped = symbol_order(faces, code_points)
    print(f"{len(files)} font files, {len(faces)} faces used ({len(left_out)} left out), "
          f"{len(ordered)} code points", flush=True)
    bench = build_benchmark(faces, [c for c, _ in ordered], size=args.size, font_size=args.font_size,
                            instance_threshold=args.instance_threshold, lookalike_threshold=args.lookalike_threshold,
                            min_faces=args.min_faces, max_faces=args.max_faces, seed=args.seed,
                            workers=args.workers, placer=on_math_axis, lookalikes=lookalike_symbols)
    extra.update(faces_left_out=left_out, code_points_mapped=coverage,
                 seconds=round(time.perf_counter() - t0, 1))
    out = write_math_folder(bench, args.out, dict(ordered), mapped, extra)
    m = bench.manifest
    per = [len(r) for r in bench.renders]
    print(f"{'face':<34}{'family':<18}{'mapped':>7}{'kept':>6}  notes")
    for f in sorted(m["faces"], key=lambda f: (f["family"], f["name"])):
        print(f"{f['name'][:33]:<34}{f['family'][:17]:<18}{f['covered']:>7}{f['kept']:>6}  {f['dropped']}")
    print(f"kept {m['characters']} symbols, {m['images']} images (faces per symbol min {min(per, default=0)} / "
          f"median {float(np.median(per)) if per else 0} / max {max(per, default=0)}); dropped "
          f"{len(m['dropped_characters']['lookalike'])} look-alikes, "
          f"{len(m['dropped_characters']['too_few_faces'])} with fewer than {args.min_faces} distinct faces; "
          f"{time.perf_counter() - t0:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
