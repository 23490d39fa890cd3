"""Callbacks: what the Trainer calls, in which order and with what; a callback stops a run cleanly."""
import json

from deepmetric import Callback
from deepmetric.config import load_config
from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE

VAL = ["data.train_classes=[0,1,2,3,4,5,6]", "data.val_classes=[5,6]"]  # 5 train, 2 validate


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_step_end(self, trainer, record):
        self.events.append(("step", record["step"], "loss" in record))
        if record["step"] == self.stop_at:
            trainer.should_stop = True

    def on_evaluation(self, trainer, split, metrics):
        self.events.append(("eval", split, trainer.step, trainer.final_test, "recall@1" in metrics))

    def on_checkpoint(self, trainer, name, path):
        self.events.append(("checkpoint", name, trainer.step, (path / "state.json").is_file()))

    def on_fit_end(self, trainer, summary):
        self.events.append(("end", summary["last_step"]))


def test_call_order_and_arguments(tmp_path, tiny_overrides):
    cb, rows = Recorder(), []
    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=4", "train.eval_every=2", "train.log_every=2",
                               *VAL])
    Trainer(cfg, tmp_path / "run", callbacks=[cb], on_log=rows.append).fit()
    improved = ("checkpoint", "best", 4, True) in cb.events
    assert cb.events == [
        ("eval", "val", 0, False, True), ("eval", "test", 0, False, True),  # untrained
        ("step", 1, False), ("step", 2, True), ("eval", "val", 2, False, True),
        ("checkpoint", "last", 2, True), ("checkpoint", "best", 2, True),
        ("step", 3, False), ("step", 4, True), ("eval", "val", 4, False, True), ("checkpoint", "last", 4, True),
        *([("checkpoint", "best", 4, True)] if improved else []),
        ("eval", "test", 4, True, True), ("end", 4)]
    # on_log keeps its meaning: every metrics.jsonl row, in order
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == logged


def test_a_callback_stops_the_run_after_its_step(tmp_path, tiny_overrides):
    cb = Recorder(stop_at=3)
    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=50"])
    summary = Trainer(cfg, tmp_path / "run", callbacks=[cb]).fit()
    assert summary["last_step"] == 3 and summary["step"] == 3
    assert read_checkpoint(tmp_path / "run", "last")[1]["step"] == 3
    assert read_checkpoint(tmp_path / "run", "best")[1]["step"] == 3, "no validation: the stop step is reported"
    assert [e for e in cb.events if e[0] == "step"][-1] == ("step", 3, True)
    assert cb.events[-2][:4] == ("eval", "test", 3, True), "the final test evaluation runs"
    assert any("stopped at step 3 by a callback" in n for n in summary["notes"])
