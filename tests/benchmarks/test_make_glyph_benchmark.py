"""benchmarks/make_glyph_benchmark.py: the CJK glyph benchmark builder, small, on the installed fonts.

A handful of common characters in at most four installed CJK faces (CI installs two small font
packages, see .ci/run); skipped with the reason when no CJK face is installed, failed under ``CI=true``. The folder it writes
is read back through deepmetric's ordinary ``image_folder`` format.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load, read_back
from PIL import Image

from tests.conftest import require

CHARS = [ord(c) for c in "的一是不了人我在有他这中大来"]
mg = load("make_glyph_benchmark")


def _cjk_faces(limit=4):
    """Installed faces that map every test character: from the Debian packages, else any font under
    /usr/share/fonts; the smallest files first (quick to open)."""
    files = {}
    try:
        files = mg.package_fonts(mg.PACKAGES)
    except OSError:  # no dpkg
        pass
    if not files and Path("/usr/share/fonts").is_dir():
        files = mg.folder_fonts("/usr/share/fonts")
    found = []
    for path, family in sorted(files.items(), key=lambda kv: Path(kv[0]).stat().st_size):
        found += [f for f in mg.enumerate_faces({path: family}) if set(CHARS) <= mg.face_charmap(f)]
        if len(found) >= limit:
            break
    return found[:limit]


@pytest.fixture(scope="module")
def faces():
    found = _cjk_faces()
    require(len(found) >= 2, "fewer than two installed CJK faces map the test characters "
                             "(apt-get install fonts-wqy-microhei fonts-arphic-gkai00mp)")
    return found


def test_small_benchmark_reads_as_an_image_folder(tmp_path, faces):
    bench = mg.build_benchmark(faces, CHARS, size=32, min_faces=1, log=lambda *_: None)
    m = bench.manifest
    assert m["characters_asked"] == len(CHARS) and 1 <= m["characters"] <= len(CHARS)
    assert len(m["faces"]) == len(faces) and all(f["covered"] == len(CHARS) for f in m["faces"])
    for imgs, ids in zip(bench.renders, bench.face_ids):
        assert imgs.shape[1:] == (32, 32) and imgs.dtype == np.uint8 and len(imgs) == len(ids)
        assert len(set(ids)) == len(ids), "one render per face"
        d = mg.mean_abs_difference(imgs, imgs)
        assert (d[~np.eye(len(imgs), dtype=bool)] >= m["instance_threshold"]).all(), "renders are distinct"
    out = mg.write_image_folder(bench, tmp_path / "glyphs", {c: 1 for c in CHARS})
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(f"U+{c:04X}" for c in bench.chars)
    png = next((out / folders[0]).glob("*.png"))
    with Image.open(png) as im:
        assert im.mode == "L" and im.size == (32, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == sum(len(list((out / f).glob("*.png"))) for f in folders)
    assert [c["folder"] for c in manifest["characters_detail"]] == [f"U+{c:04X}" for c in bench.chars]

    read_back(out, 1, 32, len(folders))

    again = mg.write_image_folder(bench, out)  # a folder it wrote is replaced
    assert sorted(p.name for p in again.iterdir() if p.is_dir()) == folders
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not written by this script"):
        mg.write_image_folder(bench, tmp_path / "other")


def test_render_face_covers_mapped_characters_only(faces):
    face = faces[0]
    unmapped = 0x10FFFD  # a private-use code point no CJK face draws
    images, covered, dropped = mg.render_face(face, CHARS + [unmapped], size=24)
    assert covered[:-1].all() and not covered[-1]
    assert images.shape == (len(CHARS) + 1, 24, 24) and images[:-1].max() == 255
    assert (images[-1] == 0).all() and not dropped


def test_duplicates_and_lookalikes():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    renders = np.stack([a, a, b, np.clip(a.astype(int) + 1, 0, 255).astype(np.uint8)])
    assert mg.distinct_renders(renders, 0.02) == [0, 2], "exact and near copies of render 0 are dropped"
    # character 2 draws like character 0 in every face: it is dropped for 0 (the more frequent)
    images = rng.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)  # (faces, characters, H, W)
    images[:, 2] = images[:, 0]
    covered = np.ones((3, 3), dtype=bool)
    assert mg.lookalike_characters(images, covered, 0.005) == {2: 0}
    covered[1, 0] = False  # still alike on the faces both characters cover
    assert mg.lookalike_characters(images, covered, 0.005) == {2: 0}


def test_face_order_round_robins_families():
    faces = [mg.Face(f"/f{i}.ttf", 0, f"f{i}", fam) for i, fam in enumerate("aabbc")]
    covered = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=bool)
    assert mg.face_order(faces, covered).tolist() == [0, 3, 4, 1, 2]


def test_common_characters_from_a_frequency_dictionary(tmp_path):
    words = tmp_path / "dict.txt"
    # 們 is traditional (not GB 2312); "ab" is not CJK
    words.write_text("的 100 u\n一是 50 m\n是 20 v\n們 500 r\nab 900 eng\n", encoding="utf-8")
    got = mg.common_characters(3, words)
    assert [(chr(c), f) for c, f in got] == [("的", 100), ("是", 70), ("一", 50)]


def test_faces_in_a_collection(tmp_path):
    ttc = tmp_path / "x.ttc"
    ttc.write_bytes(b"ttcf" + (1 << 16).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(12))
    plain = tmp_path / "y.ttf"
    plain.write_bytes(bytes(16))
    assert mg.faces_in_file(ttc) == 3 and mg.faces_in_file(plain) == 1
    assert mg.family_of("fonts-noto-cjk-extra", "/x/NotoSerifCJK-Bold.ttc") == "noto-serif-cjk"
    assert mg.family_of("fonts-arphic-ukai", "/x/ukai.ttc") == "arphic-ukai"
