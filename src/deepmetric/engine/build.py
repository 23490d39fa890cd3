"""From a validated :class:`Config` to the objects of the data flow: data, model, losses, optimizers.

The one place that knows which recipe key sets which component parameter: components raise
:class:`~deepmetric.core.errors.ParameterError` s naming their parameters (``batch_size``,
``channels``, ``root``), and each builder here turns them into a
:class:`~deepmetric.config.ConfigError` naming the keys (``data.batch_size``, ``model.in_chans``,
``data.root``), as it does for a bad free-form value (``data.options``, ``losses.N.params``).
"""
from __future__ import annotations

import inspect
import logging
import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError, load_config
from ..core.errors import ParameterError
from ..core.registry import UnknownNameError
from ..data.base import DataError, DataSplits, VerificationPairs
from ..data.formats import DATASETS
from ..data.loading import normalisation_on_device
from ..data.protocol import ClassSplitError
from ..data.protocol import apply as apply_protocol
from ..models import BACKBONES, Embedder, Ensemble, build_embedder, load_pretrained, load_weights, read_state_dict
from .checkpoint import CONFIG, load_model_weights, read_checkpoint, resolve_checkpoint

log = logging.getLogger("deepmetric")

#: config.yaml's prefix for a model or loss given as a Python object (``python:TinyNet``), see
#: :mod:`.python_objects`: a name no catalogue holds, which no config can rebuild
PYTHON = "python:"

#: the recipe key of each parameter that components name in their errors
KEYS = {
    "classes_per_batch": "data.classes_per_batch", "samples_per_class": "data.samples_per_class",
    "batch_size": "data.batch_size", "decoder": "data.decoder", "image_size": "data.image_size",
    "root": "data.root", "channels": "model.in_chans", "in_chans": "model.in_chans",
    "pooling": "model.pooling", "train_classes": "data.train_classes", "test_classes": "data.test_classes",
    "val_classes": "data.val_classes",
}


def resolve_paths(cfg: Config) -> Config:
    """The recipe with its relative paths made absolute (``data.root``, ``eval.lfw_root``,
    ``model.pretrained``, ``model.init_from``), so a run resumes and evaluates from any folder."""
    def absolute(value: Optional[str]) -> Optional[str]:
        if value and value != "imagenet" and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"root": absolute(cfg.data.root)}),
        "eval": cfg.eval.model_copy(update={"lfw_root": absolute(cfg.eval.lfw_root)}),
        "model": cfg.model.model_copy(update={"pretrained": absolute(cfg.model.pretrained),
                                              "init_from": absolute(cfg.model.init_from)}),
    })


def seed_everything(seed: int) -> None:
    """Python's, numpy's global and torch's generators from ``seed`` (PML's sampler draws from numpy's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_pairs(cfg: Config, losses: nn.ModuleList) -> None:
    """Refuse P x K batches of one image per class (``data.samples_per_class=1``) for a pair loss
    without a cross-batch memory: no batch would hold a positive pair, and the loss would be zero
    from the first step to the last (classification losses and memories, which keep other batches'
    embeddings, train as usual)."""
    from ..losses import CrossBatchMemory

    if cfg.data.sampler != "pk" or cfg.data.samples_per_class > 1:
        return
    for i, fn in enumerate(losses):
        if getattr(fn, "kind", None) == "pair" and not isinstance(fn, CrossBatchMemory):
            name = cfg.losses[i].name if i < len(cfg.losses) else type(fn).__name__
            raise ConfigError(f"data.samples_per_class=1: a batch holds one image per class, so the pair loss "
                              f"losses.{i} ({name}) never sees a positive pair and would train nothing; set "
                              f"data.samples_per_class to 2 or more")


def build_transforms(cfg: Config):
    from ..data.transforms import build_transform

    size = tuple(cfg.data.image_size) if cfg.data.image_size else None
    try:
        # images arrive in the model's channel count (greyscale for model.in_chans=1)
        return tuple(build_transform(cfg.data.transform, train=train, image_size=size, decoder=cfg.data.decoder,
                                     channels=cfg.model.in_chans) for train in (True, False))
    except ParameterError as e:
        key = "data.decoder" if "decoder" in e.params else "data.transform"
        raise ConfigError(f"{key}: {e.naming(KEYS)}") from None


def build_data(cfg: Config, validation: bool = True) -> DataSplits:
    """The recipe's splits: the format's, then the class split and (with ``validation``) the
    validation split of ``data``. Evaluating a trained model needs no validation split."""
    try:
        builder = DATASETS.get(cfg.data.format)
    except UnknownNameError as e:
        raise ConfigError(f"data.format: {e}") from None
    train_tf, test_tf = build_transforms(cfg)
    opts = dict(cfg.data.options)
    valid = [p for p in inspect.signature(builder).parameters if p not in ("root", "train_transform", "test_transform")]
    for key in opts:
        if key not in valid:
            raise ConfigError(f"data.options.{key}: format '{cfg.data.format}' has no option '{key}' "
                              f"(valid: {', '.join(valid) or 'none'})")
    keys = {**KEYS, **{key: f"data.options.{key}" for key in valid}}
    try:
        splits = builder(cfg.data.root, train_transform=train_tf, test_transform=test_tf, **opts)
    except DataError as e:  # names a file; and the root or option to change, as keys
        raise e.renamed(keys) from None
    except ParameterError as e:  # an option with a bad value, named by its key (data.options.parts[0].format)
        if e.params and all(name in keys for name in e.params):
            raise ConfigError(e.naming(keys)) from None
        raise ConfigError(f"data.options ({cfg.data.format}): {e.naming(keys)}") from None
    return protocol(cfg, splits, test_tf, training=validation)


def protocol(cfg: Config, splits: DataSplits, eval_transform=None, class_split: bool = True,
             training: bool = True) -> DataSplits:
    """:func:`deepmetric.data.protocol.apply` of the recipe's ``data`` for its ``eval.protocol``, with
    a bad class list named by its recipe key."""
    try:
        return apply_protocol(splits, cfg.data, layout=cfg.eval.protocol, eval_transform=eval_transform,
                              class_split=class_split, training=training)
    except ClassSplitError as e:
        raise ConfigError(e.naming(KEYS)) from None


def build_verification_pairs(cfg: Config) -> Optional[VerificationPairs]:
    """The LFW pairs of ``eval.lfw_root`` / ``eval.lfw_pairs`` (None without ``eval.lfw_root``)."""
    c = cfg.eval
    if not c.lfw_root:
        return None
    _, test_tf = build_transforms(cfg)
    return DATASETS.get("lfw")(c.lfw_root, test_transform=test_tf, pairs=c.lfw_pairs or "pairs.txt").pairs


def python_model_error(cfg: Config, ckpt: Optional[Path] = None) -> Optional[ConfigError]:
    """The error for a recipe whose ``model.backbone`` is ``python:<class>`` (a model given in Python,
    see :mod:`.python_objects`), which no config rebuilds: it says how to evaluate that run's
    checkpoint ``ckpt`` (default ``RUN/checkpoints/best``) in Python. None for a catalogued backbone."""
    backbone = cfg.model.backbone
    if not backbone.startswith(PYTHON):
        return None
    cls = backbone[len(PYTHON):]
    best = ckpt if ckpt is not None else "RUN/checkpoints/best"
    return ConfigError(
        f"model.backbone: '{backbone}': the run's model was given in Python (Trainer(..., model={cls}())), so "
        f"its config cannot rebuild it and commands that load a run (eval, embed, export, search, serve) "
        f"cannot use it; evaluate it in Python: from deepmetric.engine.checkpoint import load_model_weights; "
        f"model = {cls}(); load_model_weights(model, '{best}'); "
        f"cfg = deepmetric.load_config('{best}'); "
        f"deepmetric.Evaluator(cfg, deepmetric.build_data(cfg, validation=False)).run(model)")


def model_from_checkpoint(cfg: Config, ckpt: Path) -> "Embedder | Ensemble":
    """The model of recipe ``cfg`` with the weights of checkpoint folder ``ckpt`` (not yet on a
    device, in train mode): what ``deepmetric eval`` and :func:`load_for_inference` load. A model
    given in Python is refused (:func:`python_model_error`)."""
    model = build_model(cfg, load_weights=False, ckpt=ckpt)
    load_model_weights(model, ckpt)
    return model


def build_model(cfg: Config, load_weights: bool = True, ckpt: Optional[Path] = None) -> "Embedder | Ensemble":
    """The recipe's model (with ``load_weights``, its ``model.pretrained`` and ``model.init_from``): an
    :class:`~deepmetric.models.Embedder`, or with ``model.members`` above 1 an
    :class:`~deepmetric.models.Ensemble` of that many (each member's initial weights drawn in turn); a
    model given in Python is refused (:func:`python_model_error`, naming ``ckpt`` when loading one)."""
    m = cfg.model
    error = python_model_error(cfg, ckpt)
    if error is not None:
        raise error
    _check_backbone_options(m.backbone, m.backbone_options)
    try:
        members = [build_embedder(m.backbone, m.embedding_dim, m.pooling, m.bnneck, m.normalize,
                                  in_chans=m.in_chans, backbone_options=m.backbone_options, retrieval=m.retrieval)
                   for _ in range(m.members)]
    except ParameterError as e:
        options = {key: f"model.backbone_options.{key}" for key in m.backbone_options}
        raise ConfigError(e.naming({**KEYS, "name": "model.backbone", **options})) from None
    except TypeError as e:  # a timm model's own keyword arguments, which only timm knows
        raise ConfigError(f"model.backbone_options: {e}") from None
    if load_weights and m.pretrained:
        for member in members:
            load_pretrained(member, m.pretrained, m.backbone)
    model = members[0] if m.members == 1 else Ensemble(members)
    if load_weights and m.init_from:
        if m.members > 1:
            raise ConfigError("model.init_from starts one network from a run's weights; with model.members "
                              f"{m.members} every member would start alike: set model.members=1")
        init_from_run(model, m.init_from)
    if m.freeze_bn and not model.freeze_batchnorm(affine=m.freeze_bn_affine):
        raise ConfigError(f"model.freeze_bn: backbone '{m.backbone}' has no BatchNorm layer to freeze; "
                          f"set model.freeze_bn=false")
    return model


def _check_backbone_options(backbone: str, options: Dict) -> None:
    """``model.backbone`` is catalogued and takes every ``model.backbone_options`` key (timm models
    take any: timm checks them)."""
    if backbone.startswith("timm:"):
        return
    try:
        params = inspect.signature(BACKBONES.get(backbone)).parameters
    except UnknownNameError as e:
        raise ConfigError(f"model.backbone: {e}") from None
    valid = [p for p in params if p != "in_chans"]
    for key in options:
        if key not in valid:
            raise ConfigError(f"model.backbone_options.{key}: backbone '{backbone}' has no option '{key}' "
                              f"(valid: {', '.join(valid) or 'none'}; model.in_chans sets the input channels)")


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
    except ParameterError as e:
        raise ConfigError(f"data.sampler={d.sampler}: {e.naming(KEYS)}") from None


def build_device_normalisation(cfg: Config, dataset, device):
    """``data.normalize_on_device`` for ``dataset`` on ``device``: ``(view, batch_normalize)``, see
    :func:`deepmetric.data.loading.normalisation_on_device`."""
    try:
        return normalisation_on_device(dataset, cfg.data.normalize_on_device, device)
    except ParameterError as e:
        raise ConfigError(f"data.normalize_on_device: {e.naming({'setting': 'it'})}") from None


def channels_last(setting, device, model: nn.Module) -> bool:
    """``train.channels_last`` for ``model`` on ``device``: ``auto`` is on for a CPU and a network
    with a 2-d convolution (oneDNN runs them fastest in NHWC order; measured by
    ``benchmarks/bench_cpu_step.py``), off elsewhere (on a GPU it pays mainly under
    mixed precision, which ``bench_gpu.py`` measures: set it there by hand)."""
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def init_from_run(model: Embedder, path: str) -> None:
    """Stage two: start from a stage-one run's Embedder weights (its classifier lives in the losses,
    so it is skipped by construction); a changed head (embedding size) keeps its fresh init, another
    backbone is refused (WeightsError naming the first tensor that differs), as are NaN weights."""
    ckpt = resolve_checkpoint(path)
    report = load_weights(model, read_state_dict(ckpt / "model.safetensors"), f"model.init_from={ckpt}",
                          require=("backbone.",))
    log.info(report.summary())


def build_losses(cfg: Config, num_classes: int, embedding_dim: int) -> nn.ModuleList:
    """The recipe's loss terms (``losses``), in order: each a :class:`~deepmetric.losses.Loss`,
    classification losses sized to the training classes, pair losses wrapped in a
    :class:`~deepmetric.losses.CrossBatchMemory` where ``losses.N.memory`` is set."""
    from ..losses import LOSSES, CrossBatchMemory, Loss, build_loss

    modules = []
    for i, term in enumerate(cfg.losses):
        key = f"losses.{i}"
        try:
            ctor = LOSSES.get(term.name)
        except UnknownNameError as e:
            raise ConfigError(f"{key}.name: {e}") from None
        if not (isinstance(ctor, type) and issubclass(ctor, Loss)):
            raise ConfigError(f"{key}.name: '{term.name}' is registered as {ctor!r}, not a deepmetric.losses.Loss "
                              "subclass (which says its kind: pair or classification)")
        params = dict(term.params)
        if ctor.kind == "classification":
            if num_classes < 2:
                raise ConfigError(f"{key}: classification loss '{term.name}' needs a training set with >= 2 classes")
            params.setdefault("num_classes", num_classes)
            params.setdefault("embedding_dim", embedding_dim)
        try:
            loss = build_loss(term.name, **params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}.params: {e}") from None
        if term.labels == "instance" and (loss.kind != "pair" or term.memory is not None):
            why = "drop its memory" if loss.kind == "pair" else f"'{term.name}' is a classification loss"
            raise ConfigError(f"{key}.labels: instance labels need a pair loss without memory ({why})")
        if term.memory is not None:
            if loss.kind != "pair":
                raise ConfigError(f"{key}.memory: cross-batch memory needs a pair loss, '{term.name}' is a classification loss")
            loss = CrossBatchMemory(loss, embedding_dim=embedding_dim, size=term.memory.size,
                                    start_step=term.memory.start_step, weight=term.memory.weight)
        modules.append(loss)
    return nn.ModuleList(modules)


def own_optimizer_key(term: int) -> str:
    """The name of loss term ``term``'s own optimizer (``losses.N.optimizer``), as in checkpoints."""
    return f"losses.{term}"


_OPTIMIZERS = {
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                             weight_decay=o.weight_decay),
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay),
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay),
}


def build_optimizers(cfg: Config, model: nn.Module, losses: nn.ModuleList) -> Dict[str, torch.optim.Optimizer]:
    """``{"main": ...}`` over the model and loss parameters, with ``optimizer.param_groups`` rules
    (first matching regex on ``model.<name>`` / ``losses.<i>.<name>`` wins) and each loss term's own
    ``lr``; plus, for a loss term with ``optimizer: sgd``, its own SGD at its ``lr`` under
    :func:`own_optimizer_key` (Centroids-ReID's centre loss)."""
    o = cfg.optimizer
    # (name, parameter, the lr of the loss term it belongs to or None)
    named: List[Tuple[str, nn.Parameter, Optional[float]]] = [
        (f"model.{n}", p, None) for n, p in model.named_parameters() if p.requires_grad]
    own: Dict[int, List[nn.Parameter]] = {}
    for i, (term, loss) in enumerate(zip(cfg.losses, losses)):
        params = [(f"losses.{i}.{n}", p, term.lr) for n, p in loss.named_parameters() if p.requires_grad]
        if term.optimizer == "sgd":
            own[i] = [p for _, p, _ in params]
        else:
            named += params
    groups: Dict[Tuple[float, float], dict] = {}
    for name, p, term_lr in named:
        lr, wd = o.lr if term_lr is None else term_lr, o.weight_decay
        for rule in o.param_groups:
            if re.search(rule.match, name):
                lr = rule.lr if rule.lr is not None else lr * (rule.lr_mult or 1.0)
                wd = rule.weight_decay if rule.weight_decay is not None else wd
                break
        groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})["params"].append(p)
    out = {"main": _OPTIMIZERS[o.name](list(groups.values()), o)}
    for i, params in own.items():
        out[own_optimizer_key(i)] = torch.optim.SGD(params, lr=cfg.losses[i].lr)
    return out


def load_for_inference(path: str | Path, prefer: str = "best", device: str | torch.device = "cpu"):
    """``(model, cfg, ckpt_dir)`` from a run directory or checkpoint directory, in eval mode: the
    checkpoint's own recipe builds the model, its weights are loaded (see :mod:`.checkpoint`)."""
    ckpt, _ = read_checkpoint(path, prefer)
    cfg = load_config(ckpt / CONFIG)
    return model_from_checkpoint(cfg, ckpt).to(device).eval(), cfg, ckpt
