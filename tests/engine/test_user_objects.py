"""A model, a loss and a training set of one's own, from Python: trained, checkpointed, resumed."""
import numpy as np
import pytest
import torch
from torch import nn

from deepmetric.config import ConfigError, load_config
from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE


class TinyNet(nn.Module):  # (B, 1, 8, 8) digits -> (B, 8) unit vectors
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x):
        return nn.functional.normalize(self.body(x), dim=1)


class ScaledContrastive(nn.Module):
    """A pair loss with a learnt temperature: its parameter must be trained."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, emb, labels):
        sim = emb @ emb.T * self.log_scale.exp() * 10
        same = (labels[:, None] == labels[None]).float() - torch.eye(len(labels))
        return -(torch.log_softmax(sim - 1e4 * torch.eye(len(labels)), dim=1) * same).sum(1).div(same.sum(1)).mean()


def _cfg(tiny, *extra):
    return load_config(RECIPE, [*tiny, "model.in_chans=1", "optimizer.lr=0.01", *extra])


def test_user_model_and_loss_train_and_improve(tmp_path, tiny_overrides):
    torch.manual_seed(0)
    model, loss = TinyNet(), ScaledContrastive()
    t = Trainer(_cfg(tiny_overrides, "train.max_steps=30", "train.log_every=10"), tmp_path / "run", model=model, loss=loss)
    assert t.model is model and t.losses[0] is loss
    in_opt = {id(p) for g in t.optimizers["main"].param_groups for p in g["params"]}
    assert id(loss.log_scale) in in_opt, "the loss's parameter joins the optimizer"
    summary = t.fit()
    assert loss.log_scale.item() != 0.0, "the loss's parameter was optimized"
    losses = [r["loss"] for r in t.history if "loss" in r]
    assert losses[-1] < losses[0]
    assert summary["metrics"]["recall@1"] >= summary["untrained"]["test"]["recall@1"]
    assert summary["sources"] == {"model": "python", "loss": "python", "splits": "config"}
    ckpt, state = read_checkpoint(tmp_path / "run", "last")
    assert state["sources"]["model"] == "python"
    saved = load_config(tmp_path / "run")
    assert saved.model.backbone == "python:TinyNet" and saved.losses[0].name == "python:ScaledContrastive"


def test_checkpoint_round_trip_and_resume_with_the_same_objects(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    torch.manual_seed(0)
    Trainer(_cfg(tiny_overrides, "train.max_steps=3"), run, model=TinyNet(), loss=ScaledContrastive()).fit()
    model, loss = TinyNet(), ScaledContrastive()
    resumed = Trainer(_cfg(tiny_overrides, "train.max_steps=5"), run, resume=True, model=model, loss=loss)
    assert resumed.step == 3
    from safetensors.torch import load_file

    saved = load_file(str(read_checkpoint(run, "last")[0] / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()), "weights restored"
    assert loss.log_scale.item() != 0.0, "the loss's state restored"
    assert resumed.fit()["last_step"] == 5
    with pytest.raises(ConfigError, match="was a model made in Python.*pass it again"):
        Trainer(load_config(run, ["train.max_steps=6"]), run, resume=True)


def test_user_model_with_recipe_losses_and_bad_outputs(tmp_path, tiny_overrides):
    t = Trainer(_cfg(tiny_overrides, "train.max_steps=2", "losses=[{name: arcface}]"), tmp_path / "a", model=TinyNet())
    assert t.losses[0].weight.shape[1] == 8, "the classifier is sized to the model's embeddings"
    t.fit()

    class Flat(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ConfigError, match="must map images .* to embeddings"):
        Trainer(_cfg(tiny_overrides), tmp_path / "b", model=Flat())
    with pytest.raises(ConfigError, match="model.freeze_bn: applies to the recipe's model"):
        Trainer(_cfg(tiny_overrides, "model.freeze_bn=true"), tmp_path / "c", model=TinyNet())


def test_train_dataset_shortcut(tmp_path, tiny_overrides):
    from deepmetric.data.formats.arrays import digits

    train = digits().train
    images = torch.stack([train[i][0] for i in range(len(train))])

    class Plain(torch.utils.data.Dataset):  # (image, label), labels offset: relabelled 0..C-1
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(train.labels[i]) + 100

    t = Trainer(_cfg(tiny_overrides, "train.max_steps=2"), tmp_path / "run", train_dataset=Plain())
    assert sorted(np.unique(t.splits.train.labels)) == list(range(len(np.unique(train.labels))))
    assert t.splits.query is not None, "the recipe's test split evaluates"
    assert t.fit()["sources"]["splits"] == "python"
