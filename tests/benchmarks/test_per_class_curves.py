"""benchmarks/per_class_curves.py: per-class MAP@R at every evaluation, validation and test."""
import numpy as np
import pytest
from benchmark_scripts import load

pcc = load("per_class_curves")
RECIPE = """
data: {format: digits, train_classes: [0, 1, 2, 3, 4, 5], val_classes: [4, 5], transform: tensor,
       classes_per_batch: 4, samples_per_class: 4, num_workers: 0}
model: {backbone: small_cnn, backbone_options: {width: 4, grid: 1}, in_chans: 1, embedding_dim: 16}
losses: [{name: multi_similarity}]
train: {max_steps: 4, eval_every: 2, progress: false}
eval: {metric: map@r}
"""


def test_per_class_map_at_r_by_hand():
    # unit vectors at these angles (degrees): cosine distance grows with the angle between them
    angles = np.radians([0, 10, 102, 90, 95, 120])
    x = np.stack([np.cos(angles), np.sin(angles)], 1)
    per = pcc.per_class_map_at_r(x, [0, 0, 0, 1, 1, 1])
    # R = 2 for every query. Class 0: 0 and 10 find each other, then a class-1 vector (1/2 each);
    # 102 finds 95, 90 first (0). Class 1: 90 and 95 find each other, then 102 (1/2 each); 120
    # finds 102, then 95: (0 + 1/2) / 2
    assert per == pytest.approx({0: (0.5 + 0.5 + 0.0) / 3, 1: (0.5 + 0.5 + 0.25) / 3})


def test_rows_per_evaluation_on_both_splits(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    out_json = tmp_path / "rows.json"
    assert pcc.main(["--recipe", str(path), "--json", str(out_json)]) == 0
    import json
    rows = json.loads(out_json.read_text())
    periodic = [(r["step"], r["split"]) for r in rows if not r["final"]]
    assert periodic == [(0, "val"), (0, "test"), (2, "val"), (2, "test"), (4, "val"), (4, "test")]
    final = rows[-1]
    assert final["final"] and final["split"] == "test"
    assert {int(c) for c in rows[0]["classes"]} == {4, 5} and {int(c) for c in final["classes"]} == {6, 7, 8, 9}
    assert all(0.0 <= v <= 1.0 for r in rows for v in r["classes"].values())
    assert "test (selected)" in capsys.readouterr().out
