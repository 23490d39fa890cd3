"""From a validated :class:`Config` to the objects of the data flow: data, model, losses, optimizers.

Each builder turns a bad free-form value (``data.options``, ``losses.N.params``) into a
:class:`~deepmetric.config.ConfigError` naming the key.
"""
from __future__ import annotations

import inspect
import logging
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import Config, ConfigError, LossTerm
from ..data.base import DataSplits
from ..data.protocol import ClassSplitError, carve_validation, split_classes
from ..models import Embedder, build_embedder, load_pretrained, load_weights, read_state_dict
from ..errors import UserError
from ..registry import DATASETS, UnknownNameError

log = logging.getLogger("deepmetric")


def _register_formats() -> None:
    from ..data import formats  # noqa: F401  (registers the on-disk formats)


def build_transforms(cfg: Config):
    from ..data.transforms import build_transform

    size = tuple(cfg.data.image_size) if cfg.data.image_size else None
    try:
        # images arrive in the model's channel count (greyscale for model.in_chans=1)
        return tuple(build_transform(cfg.data.transform, train=train, image_size=size, decoder=cfg.data.decoder,
                                     channels=cfg.model.in_chans) for train in (True, False))
    except ValueError as e:
        key = "data.decoder" if "decoder" in str(e) else "data.transform"
        raise ConfigError(f"{key}: {e}") from None


def build_data(cfg: Config) -> DataSplits:
    """The recipe's splits: the format's, then the class split and the validation split of ``data``."""
    _register_formats()
    try:
        builder = DATASETS.get(cfg.data.format)
    except UnknownNameError as e:
        raise ConfigError(f"data.format: {e}") from None
    train_tf, test_tf = build_transforms(cfg)
    opts = dict(cfg.data.options)
    params = inspect.signature(builder).parameters
    for key in opts:
        if key not in params or key in ("root", "train_transform", "test_transform"):
            valid = [p for p in params if p not in ("root", "train_transform", "test_transform")]
            raise ConfigError(f"data.options.{key}: format '{cfg.data.format}' has no option '{key}' "
                              f"(valid: {', '.join(valid) or 'none'})")
    try:
        splits = builder(cfg.data.root, train_transform=train_tf, test_transform=test_tf, **opts)
    except UserError:
        raise
    except ValueError as e:  # a format's option with a bad value (its DataErrors name files and pass)
        raise ConfigError(f"data.options ({cfg.data.format}): {e}") from None
    return apply_protocol(splits, cfg, test_tf)


def apply_protocol(splits: DataSplits, cfg: Config, eval_transform=None, class_split: bool = True) -> DataSplits:
    """``data.train_classes`` / ``test_classes`` (class split, with ``class_split``) and
    ``data.val_classes`` (validation split for ``eval.protocol``, unless ``splits.val`` is set) on a
    format's splits, or on splits a user made in Python (``class_split=False``: taken as given)."""
    d = cfg.data
    try:
        if class_split:
            splits = split_classes(splits, d.train_classes, d.test_classes)
        if splits.val is None:
            splits = carve_validation(splits, d.val_classes, layout=cfg.eval.protocol, seed=d.val_seed,
                                      transform=eval_transform, min_train_classes=_min_train_classes(cfg))
    except ClassSplitError as e:
        raise ConfigError(f"data.{e}") from None
    return splits


def _min_train_classes(cfg: Config) -> int:
    """A P x K batch needs P classes; random batches and everything else need two."""
    return max(2, cfg.data.classes_per_batch) if cfg.data.sampler == "pk" else 2


def build_model(cfg: Config, load_weights: bool = True) -> Embedder:
    m = cfg.model
    try:
        model = build_embedder(m.backbone, m.embedding_dim, m.pooling, m.bnneck, m.normalize,
                               in_chans=m.in_chans, backbone_options=m.backbone_options)
    except UnknownNameError as e:
        raise ConfigError(f"model.backbone: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.backbone_options: {e}") from None
    if load_weights and m.pretrained:
        load_pretrained(model, m.pretrained, m.backbone)
    if load_weights and m.init_from:
        init_from_run(model, m.init_from)
    if m.freeze_bn and not model.freeze_batchnorm(affine=m.freeze_bn_affine):
        raise ConfigError(f"model.freeze_bn: backbone '{m.backbone}' has no BatchNorm layer to freeze; "
                          f"set model.freeze_bn=false")
    return model


def build_sampler(cfg: Config, labels, rank: int = 0, world_size: int = 1):
    """The training batch sampler named by ``data.sampler`` (``pk`` or ``random``), sharded for
    ``rank`` of ``world_size``. ``data.batch_size`` is per process, as P x K is."""
    from ..data.samplers import PKBatchSampler, RandomBatchSampler

    d = cfg.data
    pk_size = d.classes_per_batch * d.samples_per_class
    if d.sampler == "pk" and d.batch_size is not None and d.batch_size != pk_size:
        raise ConfigError(f"data.batch_size={d.batch_size} but data.sampler=pk draws classes_per_batch x "
                          f"samples_per_class = {pk_size} images; set data.batch_size=null or "
                          f"data.sampler=random")
    makers = {
        "pk": lambda: PKBatchSampler(labels, d.classes_per_batch, d.samples_per_class, seed=cfg.seed,
                                     rank=rank, world_size=world_size),
        "random": lambda: RandomBatchSampler(len(labels), d.batch_size or pk_size, seed=cfg.seed,
                                             rank=rank, world_size=world_size),
    }
    try:
        return makers[d.sampler]()
    except ValueError as e:
        raise ConfigError(f"data.sampler={d.sampler}: {e}") from None


def init_from_run(model: Embedder, path: str) -> None:
    """Stage two: start from a stage-one run's Embedder weights (its classifier lives in the losses,
    so it is skipped by construction); a changed head (embedding size) keeps its fresh init, another
    backbone is refused (WeightsError naming the first tensor that differs), as are NaN weights."""
    from .checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    report = load_weights(model, read_state_dict(ckpt / "model.safetensors"), f"model.init_from={ckpt}",
                          require=("backbone.",))
    log.info(report.summary())


def loss_kind(name: str) -> str:
    from ..losses import LOSSES

    return getattr(LOSSES.get(name), "kind", "pair")


def build_losses(cfg: Config, num_classes: int, embedding_dim: int) -> nn.ModuleList:
    from ..losses import CrossBatchMemory, LOSSES, build_loss

    modules = []
    for i, term in enumerate(cfg.losses):
        key = f"losses.{i}"
        try:
            ctor = LOSSES.get(term.name)
        except UnknownNameError as e:
            raise ConfigError(f"{key}.name: {e}") from None
        params = dict(term.params)
        if getattr(ctor, "kind", "pair") == "classification":
            if num_classes < 2:
                raise ConfigError(f"{key}: classification loss '{term.name}' needs a training set with >= 2 classes")
            params.setdefault("num_classes", num_classes)
            params.setdefault("embedding_dim", embedding_dim)
        try:
            loss = build_loss(term.name, **params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}.params: {e}") from None
        if term.memory is not None:
            if getattr(loss, "kind", "pair") != "pair":
                raise ConfigError(f"{key}.memory: cross-batch memory needs a pair loss, '{term.name}' is a classification loss")
            loss = CrossBatchMemory(loss, embedding_dim=embedding_dim, size=term.memory.size,
                                    start_step=term.memory.start_step, weight=term.memory.weight)
        modules.append(loss)
    return nn.ModuleList(modules)


def build_optimizers(cfg: Config, model: nn.Module, losses: nn.ModuleList) -> Dict[str, torch.optim.Optimizer]:
    """The main optimizer over the model and loss parameters, with ``optimizer.param_groups`` rules
    (first matching regex on ``model.<name>`` / ``losses.<i>.<name>`` wins) and each loss term's own
    ``lr``. A loss term with ``optimizer: sgd`` gets its own SGD (Centroids-ReID's centre loss)."""
    o = cfg.optimizer
    named: List[Tuple[str, nn.Parameter]] = [(f"model.{n}", p) for n, p in model.named_parameters() if p.requires_grad]
    own: Dict[str, List[nn.Parameter]] = {}
    for i, (term, loss) in enumerate(zip(cfg.losses, losses)):
        params = [(f"losses.{i}.{n}", p) for n, p in loss.named_parameters() if p.requires_grad]
        if term.optimizer == "sgd":
            own[f"losses.{i}"] = [p for _, p in params]
        else:
            named += params
    groups: Dict[Tuple, dict] = {}
    for name, p in named:
        lr, wd = o.lr, o.weight_decay
        term_lr = _term_lr(cfg.losses, name)
        if term_lr is not None:
            lr = term_lr
        for rule in o.param_groups:
            if re.search(rule.match, name):
                lr = rule.lr if rule.lr is not None else lr * (rule.lr_mult or 1.0)
                wd = rule.weight_decay if rule.weight_decay is not None else wd
                break
        groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd, "names": []})
        groups[(lr, wd)]["params"].append(p)
        groups[(lr, wd)]["names"].append(name)
    param_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]
    if o.name == "sgd":
        main = torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    elif o.name == "adam":
        main = torch.optim.Adam(param_groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    else:
        main = torch.optim.AdamW(param_groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    out = {"main": main}
    for key, params in own.items():
        i = int(key.split(".")[1])
        out[key] = torch.optim.SGD(params, lr=cfg.losses[i].lr or 0.5)
    return out


def _term_lr(terms: List[LossTerm], name: str) -> Optional[float]:
    if not name.startswith("losses."):
        return None
    return terms[int(name.split(".")[1])].lr
