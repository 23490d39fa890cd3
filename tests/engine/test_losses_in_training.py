"""Every pair loss (and XBM around each) trains the quickstart recipe for a few steps: the loss is
finite, the weights move, and checkpoints carry the memory."""
import json
import math

import pytest
import torch

from deepmetric.config import load_config
from deepmetric.engine.trainer import Trainer
from deepmetric.losses import LOSSES
from deepmetric.quickstart import RECIPE

PAIR_LOSSES = sorted({LOSSES.get(n).__name__: n for n in LOSSES.names()
                      if getattr(LOSSES.get(n), "kind", "pair") == "pair"}.values())


@pytest.mark.parametrize("memory", [False, True], ids=["plain", "xbm"])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_pair_loss_trains(name, memory, tmp_path, tiny_overrides):
    term = f"{{name: {name}" + (", memory: {size: 64, start_step: 1}" if memory else "") + "}"
    cfg = load_config(RECIPE, [*tiny_overrides, f"losses=[{term}]", "train.max_steps=3", "train.eval_every=0",
                               "optimizer.lr=0.01", "model.backbone_options={width: 8, grid: 2}"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())), "weights moved"
    if memory:
        assert int(trainer.losses[0].filled) > 0, "the memory was filled"


# -- an instance term (losses.N.labels: instance) ----------------------------------------------------------

def _instance_trainer(tmp_path, tiny_overrides, term="{name: ntxent, labels: instance, weight: 0.5, params: {temperature: 0.1}}"):
    cfg = load_config(RECIPE, [*tiny_overrides, f"losses=[{{name: multi_similarity}}, {term}]", "train.max_steps=3",
                               "train.eval_every=0", "model.backbone_options={width: 8, grid: 2}"])
    return Trainer(cfg, tmp_path / "run")


def test_instance_term_is_the_loss_on_two_views(tmp_path, tiny_overrides):
    """The term's value is its loss on the batch's embeddings and those of its second view, each image
    labelled by its position; the view is a function of the seed and the step, and moves the pixels."""
    from deepmetric.engine.step import batch_loss, second_view
    from deepmetric.losses import MultiSimilarityLoss, NTXentLoss

    trainer = _instance_trainer(tmp_path, tiny_overrides)
    trainer.model.train()
    images, labels = next(trainer._batches())[:2]
    torch.manual_seed(0)
    got = batch_loss(trainer.parts, trainer.cfg, images, labels, embeddings_only=False, distributed=False, step=5)
    view = second_view(images, torch.Generator().manual_seed((trainer.cfg.seed * 1_000_003 + 5) * 1_009))
    assert view.shape == images.shape and not torch.allclose(view, images)
    again = second_view(images, torch.Generator().manual_seed((trainer.cfg.seed * 1_000_003 + 5) * 1_009))
    assert torch.equal(view, again)
    z, z2 = trainer.model(images), trainer.model(view)
    ids = torch.arange(len(images)).repeat(2)
    want = MultiSimilarityLoss()(z, labels) + 0.5 * NTXentLoss(temperature=0.1)(torch.cat([z, z2]), ids)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    other = batch_loss(trainer.parts, trainer.cfg, images, labels, embeddings_only=False, distributed=False, step=6)
    assert not torch.allclose(other, got), "another step draws another view"
    with pytest.raises(ValueError, match=r"warps image batches \(B, C, H, W\); this model's inputs have shape \(4, 16\)"):
        second_view(torch.zeros(4, 16), torch.Generator())


def test_instance_term_trains_and_repeats(tmp_path, tiny_overrides):
    first = _instance_trainer(tmp_path / "a", tiny_overrides)
    first.fit()
    second = _instance_trainer(tmp_path / "b", tiny_overrides)
    second.fit()
    losses = [[json.loads(x)["loss"] for x in (t.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for t in (first, second)]
    assert len(losses[0]) == 3 and all(math.isfinite(v) for v in losses[0]) and losses[0] == losses[1]


@pytest.mark.parametrize("term, message", [
    ("{name: arcface, labels: instance}", r"\('arcface' is a classification loss\)"),
    ("{name: ntxent, labels: instance, memory: {size: 64}}", r"\(drop its memory\)"),
])
def test_instance_term_refuses(term, message, tmp_path, tiny_overrides):
    from deepmetric.config import ConfigError

    with pytest.raises(ConfigError, match=r"losses\.1\.labels: instance labels need a pair loss without memory " + message):
        _instance_trainer(tmp_path, tiny_overrides, term)
