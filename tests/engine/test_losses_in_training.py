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
