"""benchmarks/embedding_layers.py: a run's embedding and its backbone's pooled features, scored."""
import json

import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load

from deepmetric.config import load_config
from deepmetric.engine.build import build_data, model_from_checkpoint
from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.engine.trainer import Trainer
from deepmetric.evaluation.retrieval import retrieval_metrics

layers = load("embedding_layers")
RECIPE = ["data.format=digits", "data.train_classes=[0,1,2,3,4,5]", "data.val_classes=[4,5]",
          "data.transform=tensor", "data.classes_per_batch=4", "data.samples_per_class=4", "data.num_workers=0",
          "model.backbone=small_cnn", "model.backbone_options={width: 4, grid: 1}", "model.in_chans=1",
          "model.embedding_dim=16", "losses=[{name: multi_similarity}]", "train.max_steps=4", "train.eval_every=2",
          "train.progress=false", "eval.metric=map@r"]


def test_the_embedding_is_what_the_run_scored_and_pooled_is_the_backbone(tmp_path, capsys):
    run = tmp_path / "run"
    summary = Trainer(load_config(None, RECIPE), run).fit()
    out = tmp_path / "rows.json"
    assert layers.main([str(run), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    # the embedding's scores are the run's own: its final test and its selected validation
    written = json.loads((run / "metrics.json").read_text())
    assert row["test"]["embedding"] == pytest.approx(written["map@r"], abs=1e-6)
    assert row["step"] == written["step"] and row["val"]["embedding"] == pytest.approx(written["val"]["map@r"], abs=1e-6)
    # pooled: the backbone's feature map averaged over its 1 x 1 grid (8 channels at width 4), by hand
    cfg = load_config(str(run / "config.yaml"), [])
    model = model_from_checkpoint(cfg, read_checkpoint(run / "checkpoints" / "best")[0]).eval()
    query = build_data(cfg).query
    images = torch.stack([query[i][0] for i in range(len(query))])
    with torch.no_grad():
        pooled = F.normalize(model.backbone(images).mean((2, 3)), dim=1)
    assert pooled.shape[1] == 8 and model(images).shape[1] == 16
    by_hand = retrieval_metrics(pooled, torch.as_tensor(query.labels), ks=(1,))["map@r"]
    assert row["test"]["pooled"] == pytest.approx(float(by_hand), abs=1e-6)
    assert row["test"]["pooled"] != row["test"]["embedding"]
    assert "test: embedding / pooled" in capsys.readouterr().out and summary is not None
