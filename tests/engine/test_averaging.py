"""train.ema: the moving average of the weights is what a run evaluates, selects and saves; the live
weights train, and a resumed run continues both exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

from deepmetric import cli
from deepmetric.config import ConfigError, load_config
from deepmetric.engine.averaging import WeightAverage
from deepmetric.engine.checkpoint import CheckpointError, read_checkpoint
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE

EMA = ["train.ema=0.9", "optimizer.name=sgd", "optimizer.lr=0.05"]


def _cfg(tiny, *extra):
    return load_config(RECIPE, [*tiny, *extra])


def _files(run, which="last"):
    ckpt, _ = read_checkpoint(run, prefer=which)
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "train_state.safetensors"))


def test_the_average_follows_the_warmed_up_recursion_and_copies_integer_buffers():
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(live, 0.9)
    start = live[0].weight.detach().clone()
    assert not any(p.requires_grad for p in avg.model.parameters()) and not avg.model.training
    expected, seen = start.clone(), []
    for k in range(1, 101):
        with torch.no_grad():
            live[0].weight.add_(torch.randn(2, 3))
        live.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and its batch count
        avg.update(live)
        d = min(0.9, (1 + k) / (10 + k))
        seen.append(d)
        expected = d * expected + (1 - d) * live[0].weight.detach()
    assert seen[:3] == pytest.approx([2 / 11, 3 / 12, 4 / 13]) and seen[-1] == 0.9
    torch.testing.assert_close(avg.model[0].weight, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(avg.model[0].weight, live[0].weight)
    assert int(avg.model[1].num_batches_tracked) == int(live[1].num_batches_tracked) == 100
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(live, 1.0)


def test_a_run_evaluates_selects_and_saves_the_average_and_resumes_exactly(tmp_path, tiny_overrides):
    extra = [*EMA, "data.val_classes=[3, 4]", "data.classes_per_batch=3", "train.eval_every=3"]
    straight = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "a")
    summary = straight.fit()
    weights, state = _files(tmp_path / "a")
    live = {k[len("live."):]: v for k, v in state.items() if k.startswith("live.")}
    assert live.keys() == weights.keys()
    for k, v in straight.model.state_dict().items():  # the live weights train ...
        assert torch.equal(live[k], v.cpu()), k
    for k, v in straight.ema.model.state_dict().items():  # ... and model.safetensors is their average
        assert torch.equal(weights[k], v.cpu()), k
    assert any(not torch.equal(weights[k], live[k]) for k in weights if weights[k].is_floating_point())
    # the reported metrics are the saved average's, as deepmetric eval computes them
    assert cli.main(["eval", str(tmp_path / "a"), "--checkpoint", summary["checkpoint"]]) == 0
    evaluated = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert evaluated["recall@1"] == pytest.approx(summary["metrics"]["recall@1"], abs=1e-12)

    first = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=3"), tmp_path / "b")
    first.fit()
    resumed = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "b", resume=True)
    assert resumed.step == 3 and resumed.ema.updates == 3
    again = resumed.fit()
    for which in ("last", "best"):
        (wa, sa), (wb, sb) = _files(tmp_path / "a", which), _files(tmp_path / "b", which)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (which, k)
        for k in (k for k in sa if k.startswith("live.")):
            assert torch.equal(sa[k], sb[k]), (which, k)
    assert again["step"] == summary["step"] and again["metrics"] == summary["metrics"]


def test_off_by_default_and_a_checkpoint_without_live_weights_cannot_resume_under_ema(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    plain = Trainer(_cfg(tiny_overrides, "train.max_steps=2"), run)
    assert plain.ema is None and plain.evaluated is plain.model
    plain.fit()
    assert not [k for k in _files(run)[1] if k.startswith("live.")]
    with pytest.raises(CheckpointError, match="holds no live weights.*resume with train.ema=0"):
        Trainer(_cfg(tiny_overrides, "train.max_steps=4", "train.ema=0.9"), run, resume=True)
    with pytest.raises(ConfigError, match="train.ema"):
        _cfg(tiny_overrides, "train.ema=1.5")
