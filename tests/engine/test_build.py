"""engine.build is the one place that maps a component's parameters to recipe keys: components name
their parameters, the recipe's errors name keys."""
import importlib
import inspect

import pytest

from deepmetric.config import ConfigError, load_config
from deepmetric.data.base import DataError
from deepmetric.data.formats import DATASETS
from deepmetric.data.samplers import PKBatchSampler
from deepmetric.engine.build import build_data, build_model, build_sampler
from deepmetric.losses import LOSSES, Loss
from deepmetric.models import BACKBONES
from tests.conftest import require_module


def test_a_component_names_its_parameter_and_the_build_names_the_key():
    with pytest.raises(ValueError, match=r"^classes_per_batch=5 but") as bare:
        PKBatchSampler([0, 0, 1, 1, 2, 2], 5, 2)
    assert "data." not in str(bare.value)
    cfg = load_config(None, ["data.classes_per_batch=5"])
    with pytest.raises(ConfigError, match=r"^data.sampler=pk: data.classes_per_batch=5 but the training set has only "
                                          r"3 classes; lower data.classes_per_batch$"):
        build_sampler(cfg, [0, 0, 1, 1, 2, 2])


def test_data_errors_name_the_root_and_option_keys(tmp_path):
    with pytest.raises(DataError, match=r"no data root given \(set data.root to "):
        build_data(load_config(None, ["data.format=image_folder"]))
    with pytest.raises(DataError, match=r"missing list.csv .*; set data.options.file to its name\)"):
        build_data(load_config(None, ["data.format=csv", f"data.root={tmp_path}", "data.options={}"]))
    with pytest.raises(DataError, match=r"\(set root to "):  # called directly: the parameter
        DATASETS.get("image_folder")(None)


def test_backbone_errors_name_one_key_each():
    with pytest.raises(ConfigError, match=r"^model.backbone_options.depth: backbone 'small_cnn' has no option 'depth' "
                                          r"\(valid: width, norm, grid"):
        build_model(load_config(None, ["model.backbone_options={depth: 3}"]))
    with pytest.raises(ConfigError, match=r"^model.backbone_options.norm must be one of batch, group, none, got 'x'$"):
        build_model(load_config(None, ["model.backbone_options={norm: x}"]))
    with pytest.raises(ConfigError, match=r"^model.backbone: unknown backbone 'resnet51'; did you mean"):
        build_model(load_config(None, ["model.backbone=resnet51"]))
    require_module("timm", "the train extra")
    with pytest.raises(ConfigError, match=r"^model.backbone: timm has no model 'no_such_net'"):
        build_model(load_config(None, ["model.backbone=timm:no_such_net"]))


def test_a_loss_terms_own_optimizer_lr_is_in_the_config():
    cfg = load_config(None, ["losses=[{name: triplet}, {name: center, optimizer: sgd}]"])
    assert cfg.losses[0].lr is None and cfg.losses[1].lr == 0.5
    assert load_config(None, ["losses=[{name: center, optimizer: sgd, lr: 0.1}]"]).losses[0].lr == 0.1


def _defined_in(package: str, base: type):
    out = set()
    for name in ("triplet", "pairwise", "centroid", "classification", "memory", "partial_fc"):
        module = importlib.import_module(f"{package}.{name}")
        out |= {c for _, c in inspect.getmembers(module, inspect.isclass)
                if issubclass(c, base) and c.__module__ == module.__name__}
    return out


def test_the_catalogues_list_every_component():
    """The catalogues are declared by hand (so that reading them imports nothing): each entry resolves,
    and every concrete loss of the zoo is in LOSSES."""
    registered = {LOSSES.get(n) for n in LOSSES.names()}
    abstract = {"PairLoss", "ClassificationLoss", "CrossBatchMemory"}  # bases, and the wrapper built by losses.N.memory
    assert {c for c in _defined_in("deepmetric.losses", Loss) if c.__name__ not in abstract} <= registered
    assert all(isinstance(c, type) and issubclass(c, Loss) for c in registered)
    assert all(callable(DATASETS.get(n)) for n in DATASETS.names())
    assert all(callable(BACKBONES.get(n)) for n in BACKBONES.names())
