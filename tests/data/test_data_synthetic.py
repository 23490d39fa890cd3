from __future__ import annotations

import numpy as np

from deepmetric.data import synthetic
from deepmetric.data.io import load_image


def test_generators_are_deterministic(tmp_path):
    a = synthetic.make_image_folder(tmp_path / "a", n_classes=2, per_class=2, seed=3)
    b = synthetic.make_image_folder(tmp_path / "b", n_classes=2, per_class=2, seed=3)
    for rel in ("class_00/img_000.jpg", "class_01/img_001.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    la = synthetic.make_lfw(tmp_path / "la", seed=1)
    lb = synthetic.make_lfw(tmp_path / "lb", seed=1)
    assert (la.parent / "pairs.txt").read_text() == (lb.parent / "pairs.txt").read_text()


def test_images_are_class_dependent(tmp_path):
    root = synthetic.make_image_folder(tmp_path / "f", n_classes=4, per_class=3, size=16)
    mean = {c: np.stack([np.asarray(load_image(p), dtype=np.float32) for p in sorted((root / f"class_{c:02d}").iterdir())])
            for c in range(4)}
    within = np.mean([np.abs(m - m.mean(0)).mean() for m in mean.values()])
    between = np.mean([np.abs(mean[i].mean(0) - mean[j].mean(0)).mean() for i in range(4) for j in range(i + 1, 4)])
    assert between > 2 * within


def test_sizes_and_layouts(tmp_path):
    root = synthetic.make_market(tmp_path / "m", n_ids=4, per_id=2, size=(12, 6))
    img = load_image(next((root / "query").iterdir()))
    assert img.size == (6, 12)
    names = sorted(p.name for p in (root / "bounding_box_test").iterdir())
    assert any(n.startswith("0000_") for n in names) and any(n.startswith("-1_") for n in names)
    duke = synthetic.make_market(tmp_path / "d", n_ids=2, per_id=2, style="duke")
    assert all("_f" in p.name for p in (duke / "query").iterdir())
    lfw = synthetic.make_lfw(tmp_path / "l", n_sets=3, pairs_per_set=4)
    lines = (lfw.parent / "pairs.txt").read_text().splitlines()
    assert lines[0] == "3\t4" and len(lines) == 1 + 3 * 8
