"""benchmarks/make_math_benchmark.py: the math-symbol benchmark builder, small, on installed fonts.

Three blocks of symbols in DejaVu's regular Sans, Sans Mono and Serif (Debian's fonts-dejavu-core,
installed almost everywhere; the bold face is there to be left out), built through the script's
command line and read back through deepmetric's ``image_folder`` format; skipped with that reason
when the faces are absent.
"""
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load, read_back
from PIL import Image

from tests.conftest import require

mm = load("make_math_benchmark")
mg = load("make_glyph_benchmark")
DEJAVU = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf")


def _installed(names):
    found = {}
    if Path("/usr/share/fonts").is_dir():
        for path in Path("/usr/share/fonts").rglob("*.ttf"):
            if path.name in names:
                found.setdefault(path.name, path)
    return found


@pytest.fixture(scope="module")
def dejavu():
    found = _installed(DEJAVU)
    if len(found) < len(DEJAVU):
        missing = sorted(set(DEJAVU) - set(found))
        require(False, f"DejaVu faces {missing} not installed (apt-get install fonts-dejavu-core)")
    return found


def test_build_from_a_font_folder(tmp_path, dejavu, capsys):
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    for name, path in dejavu.items():
        os.symlink(path, fonts / name)
    out = tmp_path / "math"
    blocks = ["Greek", "Arrows", "Mathematical Operators"]
    assert mm.main(["--out", str(out), "--fonts", str(fonts), "--blocks", *blocks, "--min-faces", "2"]) == 0
    assert "kept" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert m["classes"] == len(folders) > 100
    assert m["images"] == sum(len(list((out / f).glob("*.png"))) for f in folders)
    assert {f["name"] for f in m["faces"]} == {"DejaVu Sans", "DejaVu Sans Mono", "DejaVu Serif"}
    assert m["faces_left_out"] == {"DejaVu-Sans-Bold__DejaVuSans-Bold-0": "weight 700"}
    assert set(m["classes_per_block"]) <= set(blocks)
    for row in m["characters_detail"]:
        c = ord(row["char"])
        assert row["folder"] == f"U+{c:04X}" and row["name"] == unicodedata.name(row["char"])
        assert row["block"] in blocks and 2 <= len(row["faces"]) <= 3 and row["faces_mapping_it"] >= len(row["faces"])
    detail = {row["folder"]: row for row in m["characters_detail"]}
    assert detail["U+2211"]["name"] == "N-ARY SUMMATION" and detail["U+2211"]["block"] == "Mathematical Operators"
    # renders: white on black, greyscale, 48 pixels, distinct within a class
    for folder in folders[:40]:
        imgs = []
        for png in sorted((out / folder).glob("*.png")):
            with Image.open(png) as im:
                assert im.mode == "L" and im.size == (48, 48)
                imgs.append(np.asarray(im))
        imgs = np.stack(imgs)
        assert imgs[:, 0, 0].max() == 0 and imgs.max() > 128
        d = mg.mean_abs_difference(imgs, imgs)
        assert (d[~np.eye(len(imgs), dtype=bool)] >= m["instance_threshold"]).all()

    read_back(out, 1, 48, len(folders))


def test_placement_on_the_math_axis(dejavu):
    face = mg.enumerate_faces({str(dejavu["DejaVuSans.ttf"]): "dejavu"})[0]
    chars = [0x2212, 0x005F, 0x00AF, 0x27FC]  # minus, low line, macron, long rightwards arrow from bar
    images, covered, dropped = mg.render_face(face, chars, size=32, font_size=24, placer=mm.on_math_axis)
    assert covered.all()
    rows = [np.flatnonzero(img.max(1) > 64) for img in images]
    cols = [np.flatnonzero(img.max(0) > 64) for img in images]
    # the minus sits on the middle row, its ink centred; the low line below it, the macron above it
    assert abs((rows[0][0] + rows[0][-1]) / 2 - 15.5) <= 1 and abs((cols[0][0] + cols[0][-1]) / 2 - 15.5) <= 1
    assert rows[1][0] > rows[0][-1] and rows[2][-1] < rows[0][0]
    # the long arrow, wider than the square at 24 px an em, is drawn smaller and not cut
    assert dropped == {"shrunk to fit": 1} and cols[3][0] >= 1 and cols[3][-1] <= 30


def test_math_code_points():
    cps = dict(mm.math_code_points())
    assert cps[0x2211] == "Mathematical Operators" and cps[0x1D400] == "Mathematical Alphanumeric Symbols"
    assert cps[0x03B1] == "Greek" and cps[0x2260] == "Mathematical Operators"  # ≠ decomposes to two code points
    assert 0x2126 not in cps and 0x212A not in cps  # OHM SIGN is Omega, KELVIN SIGN is K
    assert 0x1D455 not in cps and 0x2329 not in cps  # a hole of the block; an APL-era bracket
    assert 2000 < len(cps) < 2300
    assert set(dict(mm.math_code_points(["Greek"])).values()) == {"Greek"}
    with pytest.raises(SystemExit, match="no block"):
        mm.math_code_points(["Arrowz"])


def test_design_family_and_face_style(dejavu):
    assert mm.design_family("fonts-lmodern", "/x/latinmodern-math.otf") == "computer-modern"
    assert mm.design_family("fonts-katex", "/x/KaTeX_Main-Regular.ttf") == "computer-modern"
    assert mm.design_family("fonts-mathjax", "/x/STIXMathJax_Main-Regular.otf") == "stix"
    assert mm.design_family("fonts-texgyre-math", "/x/texgyrepagella-math.otf") == "texgyre-pagella"
    assert mm.design_family("fonts-texgyre-math", "/x/texgyredejavu-math.otf") == "dejavu"
    assert mm.design_family("fonts-oflb-asana-math", "/x/Asana-Math.otf") == "oflb-asana-math"
    faces = {Path(f.path).name: f for f in mg.enumerate_faces({str(p): "dejavu" for p in dejavu.values()})}
    assert mm.face_style_problem(faces["DejaVuSans.ttf"]) is None
    assert mm.face_style_problem(faces["DejaVuSans-Bold.ttf"]) == "weight 700"
    assert mm.face_style_problem(mg.Face("/x/STIXSizeOneSym-Regular.otf", 0, "", "")) == "size or alternate variant"
    assert mm.face_style_problem(mg.Face("/x/lmroman12-regular.otf", 0, "", "")) == "size or alternate variant"


def test_lookalikes_by_the_median_face():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 24, 24), dtype=np.uint8)  # (faces, classes, H, W)
    images[:3, 1] = images[:3, 0]   # class 1 draws like class 0 in three faces of four
    covered = np.ones((4, 3), dtype=bool)
    assert mm.lookalike_symbols(images, covered, 0.005, screen=1.0) == {1: 0}
    # the glyph builder's rule (the mean over faces) keeps both: one face draws them apart
    assert mg.lookalike_characters(images, covered, 0.005, screen=1.0) == {}
    images[1:, 1] = rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)  # alike in one face of four
    assert mm.lookalike_symbols(images, covered, 0.005, screen=1.0) == {}
