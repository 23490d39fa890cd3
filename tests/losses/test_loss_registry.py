"""The catalogue: every registered loss builds with its defaults and trains one step; errors name
what went wrong."""
from __future__ import annotations

import warnings

import pytest
import torch

from deepmetric.losses import LOSSES, NoValidPairsWarning, build_loss, loss_names
from deepmetric.core.registry import UnknownNameError


@pytest.mark.parametrize("name", loss_names())
def test_every_loss_builds_with_defaults_and_backpropagates(name):
    kind = LOSSES.get(name).kind
    assert kind in ("pair", "classification")
    loss = build_loss(name, num_classes=6, embedding_dim=16) if kind == "classification" else build_loss(name)
    assert isinstance(loss, torch.nn.Module) and loss.kind == kind
    torch.manual_seed(0)
    x = torch.randn(24, 16, requires_grad=True)
    y = torch.arange(24) % 6
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoValidPairsWarning)  # a P x K batch always has valid tuples
        value = loss(x, y)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if kind == "classification":
        assert loss.weight.shape[1] == 16 and loss.weight.grad is not None


def test_classification_weight_layout():
    assert build_loss("arcface", num_classes=7, embedding_dim=5).weight.shape == (7, 5)
    assert build_loss("subcenter_arcface", num_classes=7, embedding_dim=5, sub_centers=3).weight.shape == (21, 5)
    assert build_loss("center", num_classes=7, embedding_dim=5).weight.shape == (7, 5)


def test_aliases():
    assert LOSSES.get("arcmargin") is LOSSES.get("arcface")
    assert LOSSES.get("msml") is LOSSES.get("quadruplet")


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'triplet'"):
        build_loss("tripplet")


def test_wrong_parameter_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        build_loss("triplet", marign=0.1)
    assert str(e.value).startswith("loss 'triplet' has no parameter 'marign'; valid: margin, mining, distance")


def test_missing_class_count():
    with pytest.raises(ValueError, match="needs parameter.*num_classes"):
        build_loss("arcface", embedding_dim=8)


@pytest.mark.parametrize("name,params", [
    ("triplet", {"mining": "hardest"}),
    ("triplet", {"distance": "manhattan"}),
    ("arcface", {"num_classes": 3, "embedding_dim": 4, "scale": 0.0}),
    ("normalized_softmax", {"num_classes": 3, "embedding_dim": 4, "temperature": -1.0}),
    ("cosface", {"num_classes": 0, "embedding_dim": 4}),
])
def test_bad_values(name, params):
    with pytest.raises(ValueError, match=name):
        build_loss(name, **params)
