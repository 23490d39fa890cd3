"""benchmarks/make_icon_benchmark.py: the icon-theme benchmark builder, on icon themes the test draws.

Six small themes in the on-disk layout of a freedesktop icon theme (``index.theme``,
``48x48/apps/x.png``, ``scalable/apps/x.svg``, links for aliases), built through the script's command
line at 32 pixels and read back through deepmetric's ``image_folder`` format. The SVGs need
``rsvg-convert`` (Debian's librsvg2-bin); the build test is skipped with that reason without it.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load, read_back
from PIL import Image, ImageDraw

from tests.conftest import require

mi = load("make_icon_benchmark")

INDEX = """[Icon Theme]
Name={name}
Directories=48x48/apps,16x16/apps,8x8/apps,scalable/apps,symbolic/apps

[48x48/apps]
Size=48
Context=Applications
Type=Fixed

[16x16/apps]
Size=16
Context=Applications
Type=Fixed

[8x8/apps]
Size=8
Context=Applications
Type=Fixed

[scalable/apps]
Size=48
MinSize=8
MaxSize=512
Context=Applications
Type=Scalable

[symbolic/apps]
Size=16
Context=Applications
Type=Scalable
"""
COLOURS = {"T1": (220, 30, 30), "T2": (30, 60, 220), "T3": (30, 160, 60), "T4": (255, 128, 0), "T5": (140, 40, 160)}
SHAPES = {  # one shape per icon name, in a 0-1 box
    "alpha": ("ellipse", (0.1, 0.1, 0.9, 0.9)), "beta": ("rectangle", (0.2, 0.2, 0.8, 0.8)),
    "gamma": ("polygon", (0.5, 0.05, 0.95, 0.95, 0.05, 0.95)), "epsilon": ("rectangle", (0.05, 0.4, 0.95, 0.6)),
    "zeta": ("polygon", (0.5, 0.05, 0.95, 0.5, 0.5, 0.95, 0.05, 0.5)), "iota": ("rectangle", (0.4, 0.05, 0.6, 0.95)),
}


def _png(path: Path, name: str, colour, px: int, alpha: int = 255, offset: float = 0.0):
    """An RGBA PNG: the name's shape in ``colour`` on a transparent ground (``offset`` moves it)."""
    kind, box = SHAPES[name]
    pts = [(v + offset) * (px - 1) for v in box]
    im = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    getattr(ImageDraw.Draw(im), kind)(pts, fill=(*colour, alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _svg(path: Path, name: str, colour):
    """The name's shape as an SVG of 48 user units."""
    kind, b = SHAPES[name]
    fill = "#%02x%02x%02x" % colour
    s = [v * 48 for v in b]
    shape = {
        "ellipse": f'<ellipse cx="{(s[0] + s[2]) / 2}" cy="{(s[1] + s[3]) / 2}" '
                   f'rx="{(s[2] - s[0]) / 2}" ry="{(s[3] - s[1]) / 2}"',
        "rectangle": f'<rect x="{s[0]}" y="{s[1]}" width="{s[2] - s[0]}" height="{s[3] - s[1]}"',
        "polygon": f'<polygon points="{" ".join(map(str, s))}"',
    }[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="48" height="48" viewBox="0 0 48 48">'
                    f'{shape} fill="{fill}"/></svg>')


def make_themes(root: Path) -> Path:
    """Themes T1-T5 (each its own family with ``--themes``), T2copy (T2's alpha, byte for byte) and
    T1-Dark (left out by name). What each class should become is said where it is drawn."""
    for t, colour in COLOURS.items():
        d = root / t
        d.mkdir(parents=True)
        (d / "index.theme").write_text(INDEX.format(name=t))
        # alpha: drawn by every theme; T1 as a 48 px PNG (its 16 px one is not chosen), T2, T3 and T5 as
        # SVGs (T3 also has a 16 px PNG: the SVG wins), T4 as a half-transparent 48 px PNG
        if t in ("T1", "T4"):
            _png(d / "48x48/apps/alpha.png", "alpha", colour, 48, alpha=128 if t == "T4" else 255)
            _png(d / "16x16/apps/alpha.png", "beta", colour, 16)
            alpha_file = "48x48/apps/alpha.png"
        else:
            _svg(d / "scalable/apps/alpha.svg", "alpha", colour)
            if t == "T3":
                _png(d / "16x16/apps/alpha.png", "alpha", colour, 16)
            alpha_file = "scalable/apps/alpha.svg"
        # alpha-alias: a link to alpha's file in every theme: an alias, not a class
        alias = d / alpha_file.replace("alpha.", "alpha-alias.")
        os.symlink(Path(alpha_file).name, alias)
        # beta: three themes only: fewer than --min-instances families
        if t in ("T1", "T2", "T3"):
            _png(d / "48x48/apps/beta.png", "beta", colour, 48)
        # gamma: T4 and T5 ship T3's file (a copy, not a link): three distinct drawings, dropped
        _png(d / "48x48/apps/gamma.png", "gamma", COLOURS["T3"] if t in ("T4", "T5") else colour, 48)
        # epsilon: its own drawing in T1-T4; T5 links it to alpha's file, a drawing alpha owns
        if t == "T5":
            os.symlink("alpha.svg", d / "scalable/apps/epsilon.svg")
        else:
            _png(d / "48x48/apps/epsilon.png", "epsilon", colour, 48)
        # zeta: T5 draws it white (a glyph for dark panels): blank on white, dropped; four remain
        _png(d / "48x48/apps/zeta.png", "zeta", (255, 255, 255) if t == "T5" else colour, 48)
        # iota: 16 px PNGs only, upscaled; T5's 8 px one is under --min-source-pixels (16)
        _png(d / ("8x8/apps/iota.png" if t == "T5" else "16x16/apps/iota.png"), "iota", colour, 8 if t == "T5" else 16)
        # symbolic names and symbolic directories are not read
        _png(d / "48x48/apps/alpha-symbolic.png", "alpha", (0, 0, 0), 48)
        _png(d / "symbolic/apps/kappa.png", "alpha", (0, 0, 0), 16)
    copy = root / "T2copy"
    (copy / "scalable/apps").mkdir(parents=True)
    (copy / "index.theme").write_text(INDEX.format(name="T2copy"))
    (copy / "scalable/apps/alpha.svg").write_bytes((root / "T2/scalable/apps/alpha.svg").read_bytes())
    dark = root / "T1-Dark"
    (dark / "48x48/apps").mkdir(parents=True)
    (dark / "index.theme").write_text(INDEX.format(name="T1-Dark"))
    _png(dark / "48x48/apps/alpha.png", "alpha", (250, 250, 250), 48)
    return root


@pytest.fixture
def rsvg():
    if mi.svg_renderer() is None:
        require(False, "rsvg-convert not installed (apt-get install librsvg2-bin)")


def test_build_from_theme_folders(tmp_path, rsvg, capsys):
    themes = make_themes(tmp_path / "themes")
    out = tmp_path / "icons"
    assert mi.main(["--out", str(out), "--size", "32", "--themes", str(themes), "--no-install"]) == 0
    assert "kept 4 classes" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["alpha", "epsilon", "iota", "zeta"]
    assert m["classes"] == 4 and [c["folder"] for c in m["classes_detail"]] == folders
    assert m["images"] == sum(len(list((out / f).glob("*.png"))) for f in folders)
    inst = {c["folder"]: {i["theme"]: i for i in c["instances"]} for c in m["classes_detail"]}
    d = m["dropped"]

    # aliases: a link in every theme is dropped for the name more families have (alpha: T2copy too)
    assert d["alias_of"]["alpha-alias"] == {"class": "alpha", "families_one_file": 5, "families_with_both": 5}
    assert inst and "alpha-alias" not in folders
    # a drawing counts once: T5 draws epsilon with alpha's file, which alpha (six families) owns
    assert set(inst["epsilon"]) == {"T1", "T2", "T3", "T4"} and "T5" in inst["alpha"]
    # duplicates: T2copy's alpha is T2's, kept once; gamma has three distinct drawings of five
    assert len({"T2", "T2copy"} & set(inst["alpha"])) == 1 and len(inst["alpha"]) == 5
    assert any(r["class"] == "alpha" and r["theme"] in ("T2", "T2copy") for r in d["renders"]["duplicate"])
    assert sum(r["class"] == "gamma" for r in d["renders"]["duplicate"]) == 2
    assert d["fewer_than_min_distinct_renders"] == ["gamma"]
    assert d["names_in_fewer_than_min_families"] == 1 and d["fewer_than_min_families_after_sharing"] == []  # beta
    # blank on white; the dark theme left out; symbolic names and directories not read
    assert d["renders"]["blank on white"] == [{"class": "zeta", "theme": "T5"}]
    themes_rows = {t["name"]: t for t in m["themes"]}
    assert not themes_rows["T1-Dark"]["used"] and "dark" in themes_rows["T1-Dark"]["excluded"]
    assert themes_rows["T1"]["skipped_names"] == {"symbolic": 1} and "kappa" not in json.dumps(m)
    assert themes_rows["T5"]["skipped_names"] == {"symbolic": 1, "PNG under 16 px": 1}
    # sources: the 48 px PNG over the 16 px one, the SVG over a smaller PNG, small PNGs upscaled
    assert inst["alpha"]["T1"]["how"] == "png" and inst["alpha"]["T1"]["source"].endswith("48x48/apps/alpha.png")
    assert inst["alpha"]["T3"]["how"] == "svg" and set(inst["iota"]) == {"T1", "T2", "T3", "T4"}
    assert {i["how"] for i in inst["iota"].values()} == {"png upscaled"}

    # white compositing: T4's half-transparent orange over white; the corners white everywhere
    with Image.open(out / "alpha" / "T4.png") as im:
        assert im.mode == "RGB" and im.size == (32, 32)
        a = np.asarray(im).astype(int)
    assert (a[0, 0] == 255).all() and np.abs(a[16, 16] - [255, 191, 127]).max() <= 3
    for f in folders:
        for png in (out / f).glob("*.png"):
            with Image.open(png) as im:
                assert im.mode == "RGB" and im.size == (32, 32) and im.getpixel((0, 0)) == (255, 255, 255)

    read_back(out, 3, 32, len(folders))


def test_best_source():
    S = mi.Source
    png48, png128 = S("a48.png", "a48.png", "png", 48, 48), S("a128.png", "a128.png", "png", 128, 128)
    png2x = S("a32@2.png", "a32@2.png", "png", 32, 64)  # 32x32@2x: 64 pixels
    svg64, svg_scalable = S("a64.svg", "a64.svg", "svg", 64, 64), S("sc.svg", "sc.svg", "svg", 512, 512)
    svg16 = S("a16.svg", "a16.svg", "svg", 16, 16)
    assert mi.best_source([png48, png128, svg64], 64) == (png128, "png")
    assert mi.best_source([png2x, svg64], 64) == (png2x, "png")
    assert mi.best_source([png48, svg_scalable, svg64], 64) == (svg64, "svg")
    assert mi.best_source([png48, svg16], 64) == (svg16, "svg")
    assert mi.best_source([png48, S("a16.png", "a16.png", "png", 16, 16)], 64) == (png48, "png upscaled")


def test_on_white_and_blank():
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((0, 0, 39, 19), fill=(0, 0, 255, 64))
    img = mi.on_white(rgba, 16)  # 40x20 -> 16x8, centred: rows 4-11
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert (img[:4] == 255).all() and (img[12:] == 255).all()
    assert np.abs(img[8, 8].astype(int) - [191, 191, 255]).max() <= 1
    assert not mi.is_blank(img)
    assert mi.is_blank(np.full((16, 16, 3), 250, np.uint8))


def test_skip_reasons():
    assert mi.skip_reason("edit-copy") is None and mi.skip_reason("firefox") is None
    assert mi.skip_reason("edit-copy-symbolic") == "symbolic"
    assert mi.skip_reason("go-next-rtl") == "direction variant"
    assert mi.skip_reason("indicator-keyboard-En") == "keyboard layout badge (text)"
    assert mi.exclusion("Papirus-Dark") and mi.exclusion("hicolor") and mi.exclusion("Papirus") is None


def test_lookalikes_stay_with_the_wider_spread_class():
    themes = [mi.Theme("A", "/a", "", "fa"), mi.Theme("B", "/b", "", "fb")]
    rng = np.random.default_rng(0)
    x, y, z = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    near = x.copy()
    near[0, 0] = 0  # one pixel off: the same drawing
    renders = [np.stack([x, y]), np.stack([near, z])]
    # class 1 ("b") draws in family fa what class 0 ("a", the wider spread) draws there
    spread = {"a": 5, "b": 4}
    assert mi.lookalike_instances(["a", "b"], [[0, 1], [0, 1]], renders, themes, spread, 0.01) == [(1, 0, 0)]
    # in different families the same drawing is no look-alike
    assert mi.lookalike_instances(["a", "b"], [[0, 1], [1, 0]], renders, themes, spread, 0.01) == []


def test_ink_difference_ignores_the_white_ground():
    white = np.full((1, 32, 32, 3), 255, np.uint8)
    small, large = white.copy(), white.copy()
    small[0, 14:18, 14:18] = (200, 0, 0)   # a 4x4 red square ...
    large[0, 14:18, 14:18] = (200, 0, 0)
    large[0, 14:18, 18:22] = (0, 0, 200)   # ... and a blue one beside it
    assert mi.ink_difference(white, white)[0, 0] == 0 and mi.ink_difference(small, small)[0, 0] == 0
    d = mi.ink_difference(small, np.concatenate([large, white]))[0]
    # blue on white differs by mean(255, 255, 55) / 255 a pixel (red too): over the 32 inked pixels half
    # differ; against white, all 16 of the square's; over the whole square 64 times less
    per_pixel = (255 + 255 + 55) / 3 / 255
    assert abs(d[0] - per_pixel / 2) < 1e-6 and abs(d[1] - per_pixel) < 1e-6
    assert mi.mean_abs_difference(small, large)[0, 0] < d[0] / 10
