"""Retrieval results as data: the same ranking as the metrics, re-ID junk flagged, JSON-ready records."""
import json

import numpy as np
import pytest

from deepmetric.cli import main
from deepmetric.evaluation import reid_metrics_from_embeddings, retrieval_metrics
from deepmetric.evaluation.results import retrieval_results
from deepmetric.core.embeddings import EmbeddingSet


def _clusters(n=60, d=8, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (rng.normal(size=(classes, d))[y] + 0.8 * rng.normal(size=(n, d))).astype(np.float32), y


def test_top1_agrees_with_recall_at_1_leave_one_out():
    x, y = _clusters()
    res = retrieval_results(x, y, k=5, distance="euclidean")
    assert res.indices.shape == (60, 5) and not (res.indices == np.arange(60)[:, None]).any(), "self left out"
    assert (np.diff(res.distances, axis=1) >= 0).all()
    m = retrieval_metrics(x, y, ks=(1, 5), distance="euclidean")
    assert res.relevant[:, 0].mean() == pytest.approx(m["recall@1"])
    assert res.relevant.any(1).mean() == pytest.approx(m["recall@5"])
    assert not res.ignored.any()


def test_reid_junk_is_flagged_and_rank1_agrees():
    x, y = _clusters(90, seed=1)
    cams = np.arange(90) % 3
    q, g = EmbeddingSet(x[:20], y[:20], cams[:20]), EmbeddingSet(x[20:], y[20:], cams[20:])
    res = retrieval_results(q.vectors, q.labels, g.vectors, g.labels, k=70, distance="euclidean",
                            query_camids=q.camids, gallery_camids=g.camids)
    same_pid = g.labels[res.indices] == q.labels[:, None]
    same_cam = g.camids[res.indices] == q.camids[:, None]
    np.testing.assert_array_equal(res.ignored, same_pid & same_cam)
    np.testing.assert_array_equal(res.relevant, same_pid & ~same_cam)
    # rank-1 = the first item the protocol keeps is relevant
    first_kept = [row_rel[~row_ign][0] for row_rel, row_ign in zip(res.relevant, res.ignored) if row_rel.any()]
    m = reid_metrics_from_embeddings(q, g, distance="euclidean")
    assert np.mean(first_kept) == pytest.approx(m["rank1"])
    rec = next(res.records(q.labels, g.labels, [f"q{i}" for i in range(20)], [f"g{i}" for i in range(70)]))
    json.dumps(rec)
    assert rec["path"] == "q0" and len(rec["neighbours"]) == 70
    assert set(rec["neighbours"][0]) == {"index", "label", "distance", "relevant", "ignored", "path"}


def test_eval_writes_neighbours_jsonl(tmp_path, checkpoint_dir, image_folder, capsys):
    out = tmp_path / "out"
    code = main(["eval", "configs/quickstart.yaml", "--checkpoint", str(checkpoint_dir), "--output", str(out),
                 "--neighbours", "3", "data.format=image_folder", f"data.root={image_folder}",
                 "data.transform=imagenet", "data.image_size=[32,32]", "model.in_chans=3",
                 "model.embedding_dim=16", "model.backbone_options={}", "data.options={}"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "neighbours.jsonl").read_text().splitlines()]
    # the quickstart recipe tests the unseen half of the classes (data.train_classes: 0.5)
    assert len(lines) == 10 and all(len(r["neighbours"]) == 3 for r in lines)
    assert lines[0]["path"].endswith(".jpg") and lines[0]["neighbours"][0]["path"].endswith(".jpg")
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.mean([r["neighbours"][0]["relevant"] for r in lines]) == pytest.approx(metrics["recall@1"])
    assert main(["eval", "configs/quickstart.yaml", "--checkpoint", str(checkpoint_dir), "--neighbours", "-1"]) == 2
    assert "give K >= 1" in capsys.readouterr().err
