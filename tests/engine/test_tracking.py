"""MLflow tracking: params, metric histories and artefacts, read back with MLflow's own client;
the package missing is one line naming the extra; a quiet library with notes in the summary."""
import logging
import subprocess
import sys

import pytest

from deepmetric import Callback
from deepmetric.config import load_config
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE
from tests.conftest import require_module


def test_mlflow_logs_params_metrics_and_artefacts(tmp_path, tiny_overrides, monkeypatch):
    require_module("mlflow", "the mlflow extra (mlflow-skinny), which the dev extra includes")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=4", "train.eval_every=2", "train.log_every=2",
                               f"tracking.mlflow={{tracking_uri: '{uri}', experiment: tiny, run_name: r1}}"])
    Trainer(cfg, tmp_path / "run").fit()
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["losses.0.params.margin"] == "0.2"
    assert run.data.params["source.model"] == "config"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/recall_at_1")] == [0, 2, 4]
    assert "final/recall_at_1" in run.data.metrics and "train/images_per_s" in run.data.metrics
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "metrics.jsonl", "checkpoints"} <= artefacts
    best = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
    assert "checkpoints/best/model.safetensors" in best


def test_missing_mlflow_names_the_extra(monkeypatch):
    from deepmetric.engine.tracking import MLflowCallback, TrackingError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(TrackingError, match=r"needs the 'mlflow' package.*pip install 'deepmetric\[mlflow\]'"):
        MLflowCallback()


def test_the_library_is_quiet_and_its_notes_are_in_the_summary(tmp_path, tiny_overrides, caplog):
    code = ("import logging, deepmetric; lg = logging.getLogger('deepmetric'); "
            "assert any(isinstance(h, logging.NullHandler) for h in lg.handlers); "
            "assert not logging.getLogger().handlers, 'basicConfig was called'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    src = (__import__("deepmetric").__file__)
    assert "basicConfig(" not in open(src).read()
    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=2", "eval.untrained=false"])
    with caplog.at_level(logging.WARNING, logger="deepmetric"):
        summary = Trainer(cfg, tmp_path / "run").fit()
    assert any("no validation split" in n for n in summary["notes"])
    assert any("no validation split" in r.getMessage() for r in caplog.records), "and in the log"


def test_init_from_is_a_note(tmp_path, tiny_overrides):
    first = tmp_path / "stage1"
    Trainer(load_config(RECIPE, [*tiny_overrides, "train.max_steps=1", "eval.untrained=false"]), first).fit()
    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=1", "eval.untrained=false", f"model.init_from={first}"])
    summary = Trainer(cfg, tmp_path / "stage2").fit()
    assert any(n.startswith("model.init_from: the model started from") and "stage1" in n for n in summary["notes"])


class _RaiseAt(Callback):
    def __init__(self, step, exc):
        self.step, self.exc, self.seen = step, exc, []

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise self.exc

    def on_fit_error(self, trainer, exc):
        self.seen.append(exc)


@pytest.mark.parametrize("exc, status", [(RuntimeError("boom at step 2"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_raises_or_is_interrupted_ends_failed_or_killed(tmp_path, tiny_overrides, monkeypatch, exc, status):
    require_module("mlflow", "the mlflow extra (mlflow-skinny), which the dev extra includes")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=4", "eval.untrained=false",
                               f"tracking.mlflow={{tracking_uri: '{uri}', experiment: tiny}}"])
    cb = _RaiseAt(2, exc)
    with pytest.raises(type(exc)):
        Trainer(cfg, tmp_path / "run", callbacks=[cb]).fit()
    assert cb.seen == [exc], "on_fit_error is called with the exception, before it is re-raised"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == status
    # the recipe's tracker runs after the callbacks given: step 2 raised before it was logged
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    if status == "FAILED":
        assert run.data.tags["deepmetric.error"] == "RuntimeError: boom at step 2"


def test_a_failing_on_fit_error_does_not_hide_the_error(tmp_path, tiny_overrides, caplog):
    class Broken(Callback):
        def on_fit_error(self, trainer, exc):
            raise ValueError("hook broke")

    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=4", "eval.untrained=false"])
    with caplog.at_level(logging.WARNING, logger="deepmetric"), pytest.raises(RuntimeError, match="boom"):
        Trainer(cfg, tmp_path / "run", callbacks=[_RaiseAt(1, RuntimeError("boom")), Broken()]).fit()
    assert any("Broken.on_fit_error failed (ValueError: hook broke)" in r.getMessage() for r in caplog.records)
