"""The trainer: resume equality, checkpoints, logs, and refusing bad input without leaving a run behind."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepmetric.config import ConfigError, load_config
from deepmetric.data.base import DataError
from deepmetric.engine.checkpoint import CheckpointError, read_checkpoint
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE


def _cfg(tiny, *extra):
    return load_config(RECIPE, [*tiny, *extra])


def _weights(run_dir, which="last"):
    ckpt, _ = read_checkpoint(run_dir, prefer=which)
    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("loss", ["triplet", "arcface"])
def test_resume_gives_identical_weights(tmp_path, tiny_overrides, loss):
    extra = [f"losses=[{{name: {loss}}}]", "scheduler.name=step", "scheduler.step_size=3",
             "optimizer.name=sgd", "optimizer.lr=0.05", "train.eval_every=3"]
    straight = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "a")
    straight.fit()
    first = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=3"), tmp_path / "b")
    first.fit()
    resumed = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "b", resume=True)
    assert resumed.step == 3
    resumed.fit()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = read_checkpoint(tmp_path / "a", "last")[1], read_checkpoint(tmp_path / "b", "last")[1]
    assert sa["step"] == sb["step"] == 6 and sa["position"] == sb["position"] and sa["epoch"] == sb["epoch"]


def test_run_directory_contents(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_overrides, "train.max_steps=4", "train.eval_every=2"), run).fit()
    assert (run / "config.yaml").is_file()
    assert load_config(run).train.max_steps == 4, "the resolved config is saved"
    for name in ("best", "last"):
        d = run / "checkpoints" / name
        assert {p.name for p in d.iterdir()} == {"model.safetensors", "train_state.safetensors", "state.json", "config.yaml"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    evals = [x for x in lines if "eval" in x]
    assert [x["step"] for x in evals] == [2, 4] and "recall@1" in evals[0]["eval"]
    assert all(np.isfinite(x["loss"]) and x["images_per_s"] > 0 for x in lines if "loss" in x)
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "no temporary leftovers"


def test_existing_run_is_not_overwritten(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_overrides, "train.max_steps=1"), run).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints; continue it with --resume"):
        Trainer(_cfg(tiny_overrides, "train.max_steps=1"), run)


def test_bad_input_leaves_no_run_directory(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    with pytest.raises(DataError, match="Fashion-MNIST root .*nowhere does not exist"):
        Trainer(_cfg(tiny_overrides, "data.format=fashion_mnist", "data.options={}", f"data.root={tmp_path / 'nowhere'}"), run).fit()
    with pytest.raises(ConfigError, match="losses.0.params: .*'marign'"):
        Trainer(_cfg(tiny_overrides, "losses=[{name: triplet, params: {marign: 0.1}}]"), run)
    with pytest.raises(ConfigError, match="data.options.train_clases: format 'digits' has no option"):
        Trainer(_cfg(tiny_overrides, "data.options={train_clases: [1]}"), run)
    assert not run.exists()


def test_missing_checkpoint_is_named(tmp_path, tiny_overrides):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nothing"):
        Trainer(_cfg(tiny_overrides), tmp_path / "nothing", resume=True)


def test_single_image_class_is_refused_by_name(tmp_path, tiny_overrides):
    from deepmetric.data.formats.arrays import digits

    splits = digits()
    keep = np.concatenate([np.flatnonzero(splits.train.labels != 4), np.flatnonzero(splits.train.labels == 4)[:1]])
    splits.train = splits.train.subset(keep)
    with pytest.raises(DataError, match="training class 4 has only one image"):
        Trainer(_cfg(tiny_overrides), tmp_path / "r", splits=splits)
