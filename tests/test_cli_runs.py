"""Runs through the command line: a run trained with a model given in Python is refused in one line
by the commands that load runs, with the Python that evaluates it (which works); the report of a
tracked run is one of its MLflow artefacts."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import deepmetric
from deepmetric.cli import main
from deepmetric.config import load_config
from deepmetric.engine.checkpoint import load_model_weights
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE
from tests.conftest import require_module


class TinyNet(nn.Module):  # (B, 1, 8, 8) digits -> (B, 8) unit vectors
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))

    def forward(self, x):
        return nn.functional.normalize(self.body(x), dim=1)


@pytest.fixture(scope="module")
def python_model_run(tmp_path_factory):
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("python_model") / "run"
    torch.manual_seed(0)
    cfg = load_config(RECIPE, [*TINY, "model.in_chans=1", "train.max_steps=2", "eval.untrained=false"])
    Trainer(cfg, run, model=TinyNet()).fit()
    return run


@pytest.mark.parametrize("command", ["eval", "embed", "export"])
def test_loading_a_python_model_run_is_one_line_saying_how(python_model_run, image_folder, tmp_path, capsys, command):
    run = python_model_run
    args = {"eval": ["eval", str(run)],
            "embed": ["embed", "--checkpoint", str(run), "--input", str(image_folder), "--output", str(tmp_path / "f.npz")],
            "export": ["export", "--checkpoint", str(run), "--format", "torchscript", "--output", str(tmp_path / "m.pt")]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "unknown" not in err
    assert "model.backbone: 'python:TinyNet': the run's model was given in Python" in err
    best = run / "checkpoints" / "best"
    assert ("from deepmetric.engine.checkpoint import load_model_weights; "
            f"model = TinyNet(); load_model_weights(model, '{best}'); "
            f"cfg = deepmetric.load_config('{best}'); "
            "deepmetric.Evaluator(cfg, deepmetric.build_data(cfg, validation=False)).run(model)") in err


def test_the_python_the_error_gives_evaluates_the_run(python_model_run):
    best = python_model_run / "checkpoints" / "best"
    model = TinyNet()
    load_model_weights(model, best)
    cfg = deepmetric.load_config(best)
    metrics = deepmetric.Evaluator(cfg, deepmetric.build_data(cfg, validation=False)).run(model).metrics
    trained = json.loads((python_model_run / "metrics.json").read_text())
    assert metrics["recall@1"] == pytest.approx(trained["recall@1"]), "the same score as the run's own test"


def test_train_with_tracking_logs_the_report(tmp_path, tiny_overrides, monkeypatch, capsys):
    require_module("mlflow", "the mlflow extra (mlflow-skinny), which the dev extra includes")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "run"
    assert main(["train", str(RECIPE), *tiny_overrides, "train.max_steps=2", "eval.untrained=false",
                 f"tracking.mlflow={{tracking_uri: '{uri}', experiment: cli}}", "--run-dir", str(run)]) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    client = MlflowClient(uri)
    [tracked] = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert tracked.info.status == "FINISHED"
    artefacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"report.html", "config.yaml", "metrics.json"} <= artefacts
    logged = Path(client.download_artifacts(tracked.info.run_id, "report.html", str(tmp_path / "got")))
    assert logged.read_text() == (run / "report.html").read_text(), "the report as written, complete"
