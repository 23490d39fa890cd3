"""The trainer's parts: a hook owns its concern and its tensors in the checkpoints; the data protocol
is one call; a run has one stop reason; the recorder writes the run's record."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepmetric.config import load_config
from deepmetric.data import protocol
from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.engine.hooks import TrainingHook
from deepmetric.engine.interrupt import StopReason, ranks_agree
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE


class CountSteps(TrainingHook):
    """A hook of one's own: counts steps in a tensor kept in the checkpoints."""

    def __init__(self):
        self.count = torch.zeros((), dtype=torch.long)

    def after_step(self, trainer):
        self.count += 1

    def extra_state(self, trainer):
        return {"count.steps": self.count}

    def load_extra_state(self, trainer, tensors, source):
        self.count = tensors["count.steps"].clone()


def test_a_hook_keeps_its_tensors_in_checkpoints_and_resumes_them(tmp_path, tiny_overrides):
    cfg = load_config(RECIPE, [*tiny_overrides, "train.max_steps=4", "train.eval_every=2"])
    first = Trainer(cfg, tmp_path / "run")
    first.hooks.append(CountSteps())
    first.fit()
    ckpt, _ = read_checkpoint(tmp_path / "run", prefer="last")
    assert int(load_file(str(ckpt / "train_state.safetensors"))["count.steps"]) == 4
    again = Trainer(cfg.with_overrides(["train.max_steps=6"]), tmp_path / "run", resume=True)
    hook = CountSteps()
    again.hooks.append(hook)
    again._restore()  # the hook joined after the trainer restored itself: restore it too
    assert int(hook.count) == 4
    again.fit()
    assert int(hook.count) == 6


def test_the_protocol_is_one_call(tmp_path):
    cfg = load_config(None, ["data.format=digits", "data.train_classes=[0,1,2,3,4,5,6]", "data.val_classes=[5,6]",
                             "data.classes_per_batch=3"])
    from deepmetric.data.formats import DATASETS

    raw = DATASETS.get("digits")(None)
    splits = protocol.apply(raw, cfg.data)
    assert sorted(np.unique(splits.val.query.labels).tolist()) == [5, 6]
    assert splits.train_class_ids.tolist() == [0, 1, 2, 3, 4]
    assert set(np.unique(splits.query.labels).tolist()) == {7, 8, 9}
    only = protocol.apply(DATASETS.get("digits")(None), cfg.data, training=False)  # evaluation: no validation
    assert only.val is None and set(np.unique(only.query.labels).tolist()) == {7, 8, 9}
    single = cfg.data.model_copy(update={"train_classes": None, "val_classes": None})
    raw = DATASETS.get("digits")(None)
    raw.train = raw.train.subset(np.concatenate([np.flatnonzero(raw.train.labels == 0)[:1],
                                                 np.flatnonzero(raw.train.labels == 1)]))
    raw.train_class_ids = None
    from deepmetric.data.base import DataError

    with pytest.raises(DataError, match="has only one image"):
        protocol.apply(raw, single)


def test_one_stop_reason_and_one_rank_agreement(tmp_path, tiny_overrides):
    class One:
        is_distributed = False

    assert ranks_agree(One(), True, due=False) is True and ranks_agree(One(), False, due=True) is False
    cfg = load_config(RECIPE, [*tiny_overrides, "data.train_classes=[0,1,2,3,4,5,6]", "data.val_classes=[5,6]",
                               "train.max_steps=20", "train.eval_every=2", "train.early_stopping=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.fit()
    assert trainer.stop_reason is StopReason.EARLY_STOPPING and summary["stopped_early"]
    assert summary["last_step"] < 20


def test_the_recorder_writes_the_rows_the_history_holds(tmp_path, tiny_overrides):
    cfg = load_config(RECIPE, [*tiny_overrides, "data.train_classes=[0,1,2,3,4,5,6]", "data.val_classes=[5,6]",
                               "train.max_steps=4", "train.eval_every=2", "train.log_every=2"])
    seen = []
    trainer = Trainer(cfg, tmp_path / "run", on_log=seen.append)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == trainer.history == seen
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert {r.get("split") for r in rows} >= {"val", "test"}  # the untrained network is step 0
