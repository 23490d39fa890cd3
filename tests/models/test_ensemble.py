"""``model.members``: an ensemble of networks of one recipe, each trained on its own loss, whose
embeddings side by side are the model's (issue 22, few classes)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from deepmetric.config import ConfigError, load_config
from deepmetric.engine.build import build_model, seed_everything
from deepmetric.engine.parts import build_training
from deepmetric.engine.step import batch_loss
from deepmetric.core.distributed import DistInfo
from deepmetric.models import Ensemble, join_embeddings

from deepmetric.engine.auto import auto_config

from tests.engine.test_auto import TINY, folder

SMALL = ["model.backbone=small_cnn", "model.backbone_options={width: 8, grid: 2}", "model.embedding_dim=16",
         "model.in_chans=1"]


def test_the_ensemble_embedding_is_the_members_side_by_side():
    seed_everything(0)
    model = build_model(load_config("quickstart", [*SMALL, "model.members=3"])).eval()
    assert isinstance(model, Ensemble) and model.embedding_dim == 48
    x = torch.randn(5, 1, 16, 16)
    out = model(x)
    alone = [F.normalize(m(x), dim=1) for m in model.members]
    torch.testing.assert_close(out, torch.cat(alone, dim=1) / 3 ** 0.5)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)
    # the cosine similarity of two images is the mean of the members' (what ranks the gallery)
    torch.testing.assert_close(out[0] @ out[1], torch.stack([a[0] @ a[1] for a in alone]).mean())
    train = model.forward_train(x)
    assert len(train["members"]) == 3 and torch.equal(train["embedding"], out)
    assert not torch.equal(model.members[0].head.proj.weight, model.members[1].head.proj.weight)  # own weights
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble([model.members[0]])
    # one unit vector joined is itself (to rounding: normalising a unit vector again may move its last bit)
    torch.testing.assert_close(join_embeddings([alone[0]]), alone[0])


def test_the_first_member_starts_as_the_single_network_would():
    seed_everything(3)
    single = build_model(load_config("quickstart", SMALL))
    seed_everything(3)
    pair = build_model(load_config("quickstart", [*SMALL, "model.members=2"]))
    for key, value in single.state_dict().items():
        assert torch.equal(pair.state_dict()[f"members.0.{key}"], value)


def test_each_member_trains_on_its_own_loss(tmp_path):
    """The ensemble's loss is the sum of each member's loss on its own embedding: each member's gradient
    is the one it would get trained alone on the batch (with an instance term too)."""
    root = folder(tmp_path / "imgs", n_classes=4, per_class=4, size=16, grey=True)
    cfg = auto_config(root, [*TINY, "model.members=2", "losses=[{name: multi_similarity}, "
                                                        "{name: ntxent, labels: instance, weight: 0.5}]"]).config
    seed_everything(0)
    parts = build_training(cfg, torch.device("cpu"), DistInfo())
    images, labels = torch.randn(12, 1, 16, 16), torch.arange(3).repeat_interleave(4)
    batch_loss(parts, cfg, images, labels, embeddings_only=False, distributed=False, step=7).backward()
    together = [[p.grad.clone() for p in m.parameters()] for m in parts.model.members]
    for i, member in enumerate(parts.model.members):
        parts.model.zero_grad()
        batch_loss(dataclasses.replace(parts, net=member), cfg, images, labels, embeddings_only=False, distributed=False, step=7).backward()
        for got, want in zip(together[i], [p.grad for p in member.parameters()]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss, what", [
    ("[{name: multi_similarity, memory: {size: 64}}]", "a cross-batch memory"),
    ("[{name: arcface}]", "weights of its own"),
])
def test_a_loss_with_state_of_its_own_is_refused(tmp_path, loss, what):
    root = folder(tmp_path / "imgs", n_classes=4, per_class=4, size=16, grey=True)
    cfg = auto_config(root, [*TINY, "model.members=2", f"losses={loss}"]).config
    with pytest.raises(ConfigError, match=f"losses.0 .* keeps {what}, which the 2 members of model.members"):
        build_training(cfg, torch.device("cpu"), DistInfo())


def test_init_from_a_run_is_refused_for_an_ensemble():
    with pytest.raises(ConfigError, match="model.init_from .* set model.members=1"):
        build_model(load_config("quickstart", [*SMALL, "model.members=2", "model.init_from=/nowhere"]))
