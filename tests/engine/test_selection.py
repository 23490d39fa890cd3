"""Model selection on a validation split carved from the training classes, never on the test split;
the test split is scored once, on the selected checkpoint, beside the untrained network."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric import cli
from deepmetric.config import ConfigError, load_config
from deepmetric.engine.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from deepmetric.engine.evaluator import EvalResult, Evaluator
from deepmetric.engine.selection import Selection
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE
from deepmetric.viz.summary import format_summary

VAL = ["data.val_classes=[3, 4]", "data.classes_per_batch=3"]


def _cfg(tiny, *extra):
    return load_config(RECIPE, [*tiny, *extra])


def _weights_key(model) -> float:
    return float(sum(p.double().sum() for p in model.state_dict().values() if p.is_floating_point()))


@pytest.fixture
def scripted(monkeypatch):
    """Evaluators that return scripted recall@1 values (validation and test disagree) and record
    which weights each call saw."""
    calls = []
    script = {"val": [0.10, 0.50, 0.90, 0.70, 0.60], "test": [0.05, 0.95, 0.20, 0.40, 0.99, 0.30, 0.11]}

    def run(self, model, neighbours=True):
        split = "val" if self.splits.train is None else "test"  # a validation split has no training set
        n = sum(1 for c in calls if c["split"] == split)
        value = script[split][n]
        calls.append({"split": split, "weights": _weights_key(model), "value": value})
        return EvalResult({"recall@1": value, "map@r": value / 2, "num_queries": 10})

    monkeypatch.setattr(Evaluator, "run", run)
    return calls


def test_best_follows_validation_and_never_the_test_split(tmp_path, tiny_overrides, scripted):
    run = tmp_path / "run"
    t = Trainer(_cfg(tiny_overrides, *VAL, "train.max_steps=8", "train.eval_every=2",
                     "eval.test_during_training=true"), run)
    summary = t.fit()
    val_calls = [c for c in scripted if c["split"] == "val"]
    test_calls = [c for c in scripted if c["split"] == "test"]
    # step 0 (untrained), then steps 2, 4, 6, 8: validation peaks at step 4 (0.90), the test split at step 6
    assert [c["value"] for c in val_calls] == [0.10, 0.50, 0.90, 0.70, 0.60]
    assert summary["step"] == 4 and summary["selected_by"] == "validation recall@1"
    assert read_checkpoint(run, "best")[1]["step"] == 4
    # the final test evaluation ran once more, on the weights validated at step 4, not the last ones
    assert len(test_calls) == 1 + 4 + 1
    assert test_calls[-1]["weights"] == val_calls[2]["weights"]
    assert test_calls[-1]["weights"] != val_calls[-1]["weights"]
    assert summary["metrics"]["recall@1"] == 0.30 and summary["val"]["recall@1"] == 0.90
    assert summary["untrained"]["val"]["recall@1"] == 0.10 and summary["untrained"]["test"]["recall@1"] == 0.05
    written = json.loads((run / "metrics.json").read_text())
    assert written["step"] == 4 and written["recall@1"] == 0.30 and written["untrained"]["test"]["recall@1"] == 0.05
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["split"]) for r in rows if "eval" in r]
    assert logged[:2] == [(0, "val"), (0, "test")] and (4, "test") in logged  # test logged, marked, not used


def test_no_validation_split_reports_the_last_step_unselected(tmp_path, tiny_overrides, scripted):
    summary = Trainer(_cfg(tiny_overrides, "train.max_steps=6", "train.eval_every=2"), tmp_path / "r").fit()
    assert summary["selected_by"] is None and summary["step"] == 6 and summary["val"] is None
    # test values at steps 2 and 4 were higher, but without validation nothing is selected
    assert summary["metrics"]["recall@1"] == 0.40
    assert read_checkpoint(tmp_path / "r", "best")[1]["step"] == 6
    assert len(scripted) == 4, "the final step's test evaluation is the reported one (no second pass)"
    text = format_summary(summary)
    assert "last step" in text and "not selected (no validation split" in text


def test_early_stopping_on_validation(tmp_path, tiny_overrides, scripted):
    summary = Trainer(_cfg(tiny_overrides, *VAL, "train.max_steps=20", "train.eval_every=2",
                           "train.early_stopping=2"), tmp_path / "r").fit()
    # validation: 0.5 (step 2), 0.9 (4), 0.7 (6), 0.6 (8): two evaluations without improvement
    assert summary["stopped_early"] and summary["last_step"] == 8 and summary["step"] == 4
    assert "stopped early at step 8" in format_summary(summary)


def test_selection_settings_need_a_validation_split(tmp_path, tiny_overrides):
    for bad in (["scheduler.name=plateau"], ["train.early_stopping=3"]):
        with pytest.raises(ConfigError, match="there is no validation split: set data.val_classes"):
            Trainer(_cfg(tiny_overrides, *bad), tmp_path / "r")
    with pytest.raises(ConfigError, match=r"eval.metric: 'recal@1' is not a metric .*did you mean 'recall@1'"):
        Trainer(_cfg(tiny_overrides, "eval.metric=recal@1"), tmp_path / "r")
    with pytest.raises(ConfigError, match=r"eval.ks.0"):
        _cfg(tiny_overrides, "eval.ks=[0]")
    assert not (tmp_path / "r").exists()


def test_summary_and_eval_report_the_same_checkpoint(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    summary = Trainer(_cfg(tiny_overrides, *VAL, "train.max_steps=6", "train.eval_every=2"), run).fit()
    assert cli.main(["eval", str(run)]) == 0
    written = json.loads((run / "metrics.json").read_text())
    assert written["step"] == summary["step"]
    for k in ("recall@1", "recall@2", "map@r", "map"):
        assert written[k] == summary["metrics"][k], k
    assert written["untrained"] == json.loads(json.dumps(summary["untrained"])), "the run's facts stay"
    assert f"(step {summary['step']})" in capsys.readouterr().out


def test_resume_truncates_the_log_and_keeps_the_untrained_row(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_overrides, *VAL, "train.max_steps=4", "train.eval_every=2"), run).fit()
    # a crash after step 6's rows were logged but before its checkpoint: rows beyond step 4 repeat
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n{broken")
    s = Trainer(_cfg(tiny_overrides, *VAL, "train.max_steps=6", "train.eval_every=2"), run, resume=True).fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["split"]) for r in rows if "eval" in r][:2] == [(0, "val"), (0, "test")]
    assert s["untrained"]["test"]["recall@1"] > 0 and s["last_step"] == 6


def test_python_splits_are_recorded_and_eval_refuses_other_data(tmp_path, tiny_overrides, capsys):
    from deepmetric.data.formats.arrays import digits
    from deepmetric.data.protocol import split_classes

    splits = split_classes(digits(), train_classes=[0, 1, 2, 3, 4], test_classes=[5, 6])
    run = tmp_path / "run"
    Trainer(_cfg(tiny_overrides, "train.max_steps=2"), run, splits=splits).fit()
    assert json.loads((run / "splits.json").read_text())["source"] == "python"
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "splits.json: the config now builds another test split than the run's" in err
    assert "test query: 363 images of 2 classes when trained, 896 images of 5 classes now" in err
    assert "given in Python" in err and len(err.strip().splitlines()) == 1
    # scoring other data on purpose (data.* overrides) is allowed
    assert cli.main(["eval", str(run), "data.test_classes=[5, 6]", "data.train_classes=null"]) == 0


def test_user_splits_get_the_recipes_validation_split(tmp_path, tiny_overrides):
    from deepmetric.data.formats.arrays import digits
    from deepmetric.data.protocol import split_classes

    splits = split_classes(digits(), train_classes=[0, 1, 2, 3, 4, 5])
    t = Trainer(_cfg(tiny_overrides, "data.val_classes=[4, 5]", "data.classes_per_batch=3", "train.max_steps=1"),
                tmp_path / "r", splits=splits)
    assert set(np.unique(t.splits.val.query.labels)) == {4, 5} and t.splits.num_classes == 4
    assert t.splits.val.query.transform is splits.query.transform
    assert torch.is_tensor(t.splits.val.query[0][0])


def test_selection_keeps_the_first_best_counts_stale_evaluations_and_copies_the_weights():
    model = torch.nn.Linear(2, 2)
    s = Selection()
    assert s.offer(2, 0.5, {"map@r": 0.5}, model) and s.weights is not None
    kept = {k: v.clone() for k, v in s.weights.items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the kept weights must not follow
    assert not s.offer(4, 0.5, {"map@r": 0.5}, model)  # a tie keeps the earlier step
    assert not s.offer(6, 0.4, {"map@r": 0.4}, model)
    assert (s.best_step, s.stale_evaluations) == (2, 2)
    assert s.exhausted(2) and not s.exhausted(3) and not s.exhausted(0)
    assert all(torch.equal(kept[k], v) for k, v in s.weights.items())
    s.load_into(model, Path("/nonexistent"))  # from memory: no checkpoint is read
    assert torch.equal(model.weight, kept["weight"])
    assert s.offer(8, 0.6, {"map@r": 0.6}, model) and s.stale_evaluations == 0
    s.reset()
    assert s == Selection()


def test_selection_state_round_trip_reads_the_best_checkpoint_and_refuses_another_step(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides)
    model = torch.nn.Linear(2, 2)
    s = Selection()
    s.offer(4, 0.7, {"recall@1": 0.7}, model)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == {"best_value": 0.7, "best_step": 4, "best_val": {"recall@1": 0.7},
                                            "stale_evaluations": 0}
    resumed = Selection()
    resumed.load_state_dict(state)
    assert resumed.weights is None and resumed.state_dict() == state
    run = tmp_path / "run"
    for step in (4, 6):  # best holds step 4, then someone copies another step's checkpoint over it
        save_checkpoint(run / "checkpoints" / "best", cfg=cfg, model=model, losses=torch.nn.ModuleList(),
                        optimizers={}, state={"step": step})
        other = torch.nn.Linear(2, 2)
        if step == 4:
            resumed.load_into(other, run)
            assert torch.equal(other.weight, model.weight)
        else:
            with pytest.raises(CheckpointError, match="holds step 6, but the run selected step 4"):
                resumed.load_into(other, run)
