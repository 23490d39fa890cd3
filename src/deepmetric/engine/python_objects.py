"""A model, a loss or a training set of one's own, given to the Trainer as Python objects.

``Trainer(cfg, run_dir, model=..., loss=..., train_dataset=...)`` trains them in place of the recipe's
parts. What that takes, kept here so the training loop does not carry it:

- :func:`mark_python_objects`: the recipe with ``python:<class>`` in ``model.backbone`` / ``losses``, so
  the run's ``config.yaml`` says what it trained (and nothing rebuilds it by mistake: see
  :func:`~deepmetric.engine.build.build_model`); settings only the recipe's own model honours refused;
- :func:`object_sources` and :func:`check_sources`: which part came from where (``state.json``'s and
  the summary's ``sources``), and a resume that must pass the same kind of part again;
- :func:`embedding_dim`: ``D`` of a model that does not say it, from one image;
- :class:`TorchTrainingSet` and :func:`with_training_set`: a plain torch ``Dataset`` as the training set.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..config import Config, ConfigError, LossTerm
from ..data.base import DataSplits, MetricDataset, relabel
from .build import PYTHON, build_data
from .checkpoint import CheckpointError


def object_sources(model: Optional[torch.nn.Module], loss: Optional[torch.nn.Module],
                   splits: Optional[DataSplits], train_dataset: Optional[torch.utils.data.Dataset]) -> Dict[str, str]:
    """``{"model", "loss", "splits"}``: ``"config"`` (built from the recipe) or ``"python"`` (given)."""
    return {"model": "config" if model is None else "python",
            "loss": "config" if loss is None else "python",
            "splits": "config" if splits is None and train_dataset is None else "python"}


def check_sources(ckpt: Path, recorded: Optional[Dict[str, str]], sources: Dict[str, str]) -> None:
    """A resume of checkpoint ``ckpt`` whose model and loss come from where the run's did
    (``recorded``: its ``state.json``'s ``sources``; none in runs older than them: the recipe's)."""
    was = recorded or {"model": "config", "loss": "config"}
    for part in ("model", "loss"):
        if was.get(part, "config") != sources[part]:
            raise CheckpointError(f"{ckpt}: the run's {part} came from {was.get(part, 'config')}, this "
                                  f"Trainer's from {sources[part]}; resume with the same {part} "
                                  f"(Trainer(..., {part}=...) for one made in Python)")




def mark_python_objects(cfg: Config, model: Optional[torch.nn.Module], loss: Optional[torch.nn.Module]) -> Config:
    """The recipe with a Python model or loss named ``python:<class>`` in ``model.backbone`` /
    ``losses``, so the run's ``config.yaml`` says what it trained; settings that only the recipe's
    own model can honour are refused; so is a run of Python objects continued without them."""
    m = cfg.model
    if model is None and m.backbone.startswith(PYTHON):
        raise ConfigError(f"model.backbone: '{m.backbone}' was a model made in Python; it cannot be rebuilt from "
                          f"the config: pass it again (Trainer(cfg, run_dir, model=..., resume=True))")
    if loss is None and any(t.name.startswith(PYTHON) for t in cfg.losses):
        raise ConfigError(f"losses: '{cfg.losses[0].name}' was a loss made in Python; pass it again "
                          f"(Trainer(cfg, run_dir, loss=..., resume=True))")
    if model is not None:
        for key, bad in (("model.pretrained", m.pretrained), ("model.init_from", m.init_from),
                         ("model.freeze_bn", m.freeze_bn), ("model.members", m.members > 1),
                         ("train.freeze_backbone_steps", cfg.train.freeze_backbone_steps and not hasattr(model, "backbone"))):
            if bad:
                raise ConfigError(f"{key}: applies to the recipe's model, not to {type(model).__name__} given in "
                                  f"Python; unset it (load weights or freeze layers in your model yourself)")
        if loss is None and any(t.input != "embedding" for t in cfg.losses):
            raise ConfigError("losses.N.input: a model given in Python gives embeddings only; "
                              "set every losses.N.input to embedding")
        cfg = cfg.model_copy(update={"model": m.model_copy(update={"backbone": PYTHON + type(model).__name__})})
    if loss is not None:
        cfg = cfg.model_copy(update={"losses": [LossTerm(name=PYTHON + type(loss).__name__)]})
    return cfg


def embedding_dim(model: torch.nn.Module, splits: DataSplits, device: torch.device) -> int:
    """The width of the embedding the losses take: ``model.loss_dim`` (an
    :class:`~deepmetric.models.Embedder`'s), ``model.embedding_dim``, or for a model without them the D
    of ``model(image)`` on one evaluation image (which checks that it gives ``(B, D)`` embeddings)."""
    dim = getattr(model, "loss_dim", None) or getattr(model, "embedding_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    dataset = splits.query if splits.query is not None else splits.train
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(dataset[0][0][None].to(device))
    model.train(was_training)
    if not torch.is_tensor(out) or out.ndim != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"model: {type(model).__name__} must map images (B, C, H, W) to embeddings (B, D); "
                          f"it gave {shape} for one image")
    return int(out.shape[1])


class TorchTrainingSet(MetricDataset):
    """A torch ``Dataset`` of ``(image, label)`` or ``(image, label, index)`` as a training set:
    labels from its ``targets`` or ``labels`` attribute (torchvision's), else read once from every
    item; relabelled ``0..C-1`` (the original ids in ``train_class_ids``). Images come as the
    dataset makes them (its own transform and augmentation, under each sample's seed)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
        self.class_ids = np.unique(np.asarray(labels, dtype=np.int64))
        super().__init__(relabel(np.asarray(labels, dtype=np.int64)), name=type(dataset).__name__)
        self.dataset = dataset

    def load(self, i: int) -> Any:
        return self.dataset[i][0]


def with_training_set(splits: Optional[DataSplits], dataset: torch.utils.data.Dataset, cfg: Config) -> DataSplits:
    """``Trainer(train_dataset=...)``: ``dataset`` trains; the evaluation splits are ``splits``'
    (as given) or the recipe's test split. A validation split must come with ``splits`` (``val``):
    one cannot be carved from a plain torch dataset."""
    if splits is None:
        splits = build_data(cfg, validation=False)  # the recipe's evaluation splits; the training set is yours
    if splits.val is None and cfg.data.val_classes is not None:
        raise ConfigError("data.val_classes: a validation split cannot be carved from train_dataset (a torch "
                          "Dataset); set data.val_classes=null, or pass splits=DataSplits(..., val=...)")
    train = TorchTrainingSet(dataset)
    return dataclasses.replace(splits, train=train, train_class_ids=train.class_ids)
