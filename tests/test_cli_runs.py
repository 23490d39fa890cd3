"""Runs through the command line: a run trained with a model given in Python is refused in one line
by the commands that load runs, with the Python that evaluates it (which works)."""
import json

import pytest
import torch
from torch import nn

import deepmetric
from deepmetric.cli import main
from deepmetric.config import load_config
from deepmetric.engine.checkpoint import load_model_weights
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE


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
