"""What a training run is made of, built in one place: :func:`build_training` -> :class:`TrainingParts`.

The data (the recipe's splits after its protocol), the model (on its device, in NHWC order where
``train.channels_last`` says so, wrapped for DDP and ``torch.compile`` as ``net``), the losses, the
optimizers, the batches (:class:`Batches`: a seeded sampler, a loader, and what is done to a batch
on the device), the evaluators of the test and validation splits, and the mixed-precision settings.
Everything that can fail on bad input fails here, before a run directory is touched. The trainer
composes these parts; it builds none of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from ..core.distributed import DistInfo
from ..data.base import DataSplits
from ..data.cache import InputCache
from ..data.loading import SeededBatchSampler, SeededDataset, affine_on_batch, loader_settings
from .build import (build_data, build_device_normalisation, build_losses, build_model, build_optimizers,
                    build_sampler, channels_last, check_pairs, protocol)
from .checkpoint import resolve_checkpoint
from .evaluator import Evaluator
from .python_objects import embedding_dim, with_training_set


class Batches:
    """The training batches as the model takes them: ``(images, labels, indices)`` on the device,
    warped (a batched random affine), normalised (on the device), in NHWC order under
    ``channels_last``. The plan is a function of the seed, the epoch and the position in the epoch
    (:class:`~deepmetric.data.loading.SeededBatchSampler`), which the checkpoint keeps."""

    def __init__(self, cfg: Config, splits: DataSplits, device: torch.device, dist: DistInfo,
                 channels_last: bool, seed: Optional[int] = None, cache: Optional[InputCache] = None) -> None:
        seed = cfg.seed if seed is None else seed
        self.device, self.channels_last = device, channels_last
        self.sampler = build_sampler(cfg.model_copy(update={"seed": seed}), splits.train.labels, dist.rank,
                                     dist.world_size)
        self.generator = torch.Generator().manual_seed(seed)
        # every sample is augmented under its own seed: the same pixels with any number of workers
        self.plan = SeededBatchSampler(self.sampler, seed, dist.rank, dist.world_size)
        self.settings = settings = loader_settings(cfg.data.num_workers, cfg.data.pin_memory, device,
                                   local_world_size=dist.local_world_size)
        # uint8 images from the workers, normalised on the device (CUDA by default)
        view, self.normalize = build_device_normalisation(cfg, splits.train, device)
        # a random affine draws per image and warps per batch (the same pixels, a fraction of the time)
        view, self.affine = affine_on_batch(view)
        if cache is not None:  # decoded once, in this process (data.cache; none with workers: input_cache)
            view = cache.wrap(view, "train")
        self.loader = DataLoader(SeededDataset(view), batch_sampler=self.plan, generator=self.generator,
                                 **settings.kwargs())
        self.epoch = 0
        self.position = 0  # batches consumed in the current epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            self.plan.set_epoch(self.epoch)
            self.plan.skip(self.position)
            for images, labels, indices in self.loader:
                self.position += 1
                yield self.on_device(images), labels.to(self.device, non_blocking=True), indices
            self.epoch += 1
            self.position = 0

    def on_device(self, images: Any) -> torch.Tensor:
        if isinstance(images, (list, tuple)):  # (images, theta) from the view affine_on_batch made
            images, theta = images
            images = self.affine(images.to(self.device, non_blocking=True), theta)
        else:
            images = images.to(self.device, non_blocking=True)
        if self.normalize is not None:
            images = self.normalize(images)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position,
                "loader_generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.generator.set_state(torch.tensor(state["loader_generator"], dtype=torch.uint8))


@dataclass
class TrainingParts:
    """The parts of a run (see the module docstring). ``model`` is the module that trains; ``net``
    is what the step calls (``model``, or it wrapped by DDP / ``torch.compile``)."""

    splits: DataSplits
    model: torch.nn.Module
    net: torch.nn.Module
    losses: torch.nn.ModuleList
    optimizers: Dict[str, torch.optim.Optimizer]
    batches: Batches
    evaluator: Evaluator  # the test split
    val_evaluator: Optional[Evaluator]  # the validation split, None without one
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    notes: List[str] = field(default_factory=list)
    #: the run's decoded inputs kept in memory (``data.cache``), None without
    cache: Optional[InputCache] = None


def check_member_losses(cfg: Config, losses: torch.nn.ModuleList) -> None:
    """``model.members``: every member takes each loss term on its own outputs, so a term that keeps
    state of its own (learned class weights or proxies, a cross-batch memory) would mix the members'
    embeddings in one state; such a term is refused, naming it."""
    for i, (term, fn) in enumerate(zip(cfg.losses, losses)):
        if term.memory is not None or any(True for _ in fn.parameters()) or any(True for _ in fn.buffers()):
            what = "a cross-batch memory" if term.memory is not None else "weights of its own"
            raise ConfigError(f"losses.{i} ({term.name}) keeps {what}, which the {cfg.model.members} members of "
                              f"model.members would share; use a pair loss without a memory, or model.members=1")


def build_training(cfg: Config, device: torch.device, dist: DistInfo, *, resume: bool = False,
                   splits: Optional[DataSplits] = None, model: Optional[torch.nn.Module] = None,
                   loss: Optional[torch.nn.Module] = None, train_dataset=None) -> TrainingParts:
    """The parts of a run of ``cfg`` (a recipe whose paths are resolved, with any model or loss of
    your own marked, see :mod:`.python_objects`) on ``device``; your own ``splits``, ``model``,
    ``loss`` or ``train_dataset`` replace the recipe's. Weights are not loaded when resuming (the
    checkpoint will be)."""
    notes: List[str] = []
    splits = training_splits(cfg, splits, train_dataset)
    if model is None:
        model = build_model(cfg, load_weights=not resume).to(device)
        if cfg.model.init_from and not resume:
            notes.append(f"model.init_from: the model started from {resolve_checkpoint(cfg.model.init_from)}")
    else:
        model = model.to(device)
    members = getattr(model, "members", None) if cfg.model.members > 1 else None
    dim = members[0].loss_dim if members else embedding_dim(model, splits, device)
    losses = (build_losses(cfg, splits.num_classes, dim) if loss is None else torch.nn.ModuleList([loss])).to(device)
    if members:
        check_member_losses(cfg, losses)
    check_pairs(cfg, losses)
    optimizers = build_optimizers(cfg, model, losses)
    cache = input_cache(cfg, device, dist)
    evaluator = Evaluator(cfg, cached_splits(splits, cache, "test"), device)
    val_evaluator = None if splits.val is None else Evaluator(cfg, cached_splits(splits.val, cache, "val"), device)
    _check_selection(cfg, val_evaluator or evaluator, val_evaluator is not None)
    nhwc = channels_last(cfg.train.channels_last, device, model)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if dist.is_distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    amp = cfg.train.amp
    return TrainingParts(
        splits=splits, model=model, net=net, losses=losses, optimizers=optimizers,
        batches=Batches(cfg, splits, device, dist, nhwc, cache=cache), evaluator=evaluator, val_evaluator=val_evaluator,
        scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp), channels_last=nhwc, notes=notes,
        cache=cache)


def input_cache(cfg: Config, device: torch.device, dist: DistInfo) -> Optional[InputCache]:
    """The run's :class:`~deepmetric.data.cache.InputCache` (``data.cache``), timed by the budget's
    clock; None when it is off or the data is read by loader workers (they decode in parallel)."""
    from . import budget

    settings = loader_settings(cfg.data.num_workers, cfg.data.pin_memory, device,
                               local_world_size=dist.local_world_size)
    cache = None if settings.num_workers else InputCache.from_setting(cfg.data.cache)
    if cache is not None:
        cache.clock = lambda: budget.CLOCK()
    return cache


def cached_splits(splits: DataSplits, cache: Optional[InputCache], key: str) -> DataSplits:
    """``splits`` whose query and gallery are read through ``cache`` (stores ``KEY/query``,
    ``KEY/gallery``), for an evaluator that embeds them again at every evaluation."""
    if cache is None:
        return splits
    import dataclasses

    wrap = lambda d, part: None if d is None else cache.wrap(d, f"{key}/{part}")  # noqa: E731
    return dataclasses.replace(splits, query=wrap(splits.query, "query"), gallery=wrap(splits.gallery, "gallery"))


def training_splits(cfg: Config, splits: Optional[DataSplits] = None, train_dataset=None) -> DataSplits:
    """The splits a run trains and selects on: the recipe's (:func:`build_data`); or ``splits`` a user
    made in Python, taken as given, the recipe's validation split carved from them; or a torch
    ``train_dataset`` with the recipe's (or ``splits``') evaluation splits (see
    :func:`~deepmetric.engine.python_objects.with_training_set`). Each passes the protocol once."""
    if train_dataset is not None:
        splits = with_training_set(splits, train_dataset, cfg)
    elif splits is None:
        return build_data(cfg)
    return protocol(cfg, splits, getattr(splits.query, "transform", None), class_split=False)


def _check_selection(cfg: Config, evaluator: Evaluator, validates: bool) -> None:
    """Selection settings that cannot work, refused before the first step."""
    evaluator.check_metric(cfg.eval.metric)
    if validates:
        return
    for bad, key in ((cfg.scheduler.name == "plateau", "scheduler.name=plateau"),
                     (cfg.train.early_stopping > 0, "train.early_stopping")):
        if bad:
            raise ConfigError(f"{key} follows the validation metric, and there is no validation split: "
                              f"set data.val_classes (e.g. 0.1), never select on the test classes")
