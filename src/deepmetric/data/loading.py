"""The training DataLoader: worker and pin-memory settings, and augmentation that does not depend on them.

Augmentation draws (crops, flips, erasing) come from torch's random generator. In a plain
DataLoader they depend on which worker loads which sample and on the worker seeds drawn when an
iterator starts, so the same run with 0 or 8 workers trains on different pixels, and a run resumed
with workers does not redo the draws it would have made. Here every sample is loaded under its own
seed, a function of ``(seed, epoch, global batch number, slot in the batch)`` only:

* :class:`SeededBatchSampler` wraps a batch sampler (``set_epoch``/``skip`` protocol, e.g.
  :class:`~deepmetric.data.samplers.PKBatchSampler`) and yields ``(index, sample_seed)`` pairs;
* :class:`SeededDataset` loads ``dataset[index]`` with torch's CPU generator seeded by
  ``sample_seed`` and restores the generator's state afterwards, so the caller's stream is untouched
  (a run with no workers draws the same model-side numbers as before).

A run therefore sees bit-identical batches with any ``data.num_workers``, on any number of ranks
with the same global batches, and after ``--resume``; workers can stay alive across epochs
(``persistent_workers``) because no per-iterator worker seed matters.

:func:`loader_settings` resolves ``data.num_workers: auto`` and ``data.pin_memory: auto``;
:func:`normalisation_on_device` resolves ``data.normalize_on_device`` (uint8 images from the
workers, normalised on the GPU); :func:`affine_on_batch` moves a random affine's warp from the
images to their batch (the same pixels, one ``grid_sample`` per batch).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from ..core.errors import ParameterError

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """A 63-bit seed for one sample, mixed with splitmix64 (distinct inputs, unrelated streams)."""
    x = 0
    for part in (seed, epoch, batch, slot):
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 30
        x = x * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 27
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK


class SeededBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Yields each batch of ``batch_sampler`` as ``[(index, sample_seed), ...]``.

    The global batch number is ``position * world_size + rank`` (the PK sampler deals global batch
    ``b`` to rank ``b % world_size``), so every sample of a global batch gets the seed it would get
    in a one-process run over the same batches. ``set_epoch`` and ``skip`` pass through to the
    wrapped sampler, whose plan is a function of ``(seed, epoch)``: the checkpoint keeps the epoch and
    the position in it.
    """

    def __init__(self, batch_sampler: Any, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.batch_sampler = batch_sampler
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._start = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.batch_sampler.set_epoch(epoch)

    def skip(self, batches: int) -> None:
        self._start = int(batches)
        self.batch_sampler.skip(batches)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        start, self._start = self._start, 0
        for position, batch in enumerate(self.batch_sampler, start):
            number = position * self.world_size + self.rank
            yield [(int(i), sample_seed(self.seed, self.epoch, number, slot)) for slot, i in enumerate(batch)]


class SeededDataset(Dataset):
    """``dataset[index]`` loaded with torch's CPU generator seeded for that sample (see module doc).

    Plain integer keys load without reseeding (evaluation order needs no randomness).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | Tuple[int, int]):
        if isinstance(key, tuple):
            index, seed = key
            gen = torch.default_generator  # the CPU generator transforms draw from
            saved = gen.get_state()
            gen.manual_seed(seed)  # ~1 us; torch.manual_seed also queues every device: ~90 us
            try:
                return self.dataset[index]
            finally:
                gen.set_state(saved)
        return self.dataset[key]


@dataclass(frozen=True)
class LoaderSettings:
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    def kwargs(self) -> dict:
        out = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers:
            out.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        return out


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or Slurm's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def loader_settings(num_workers: int | str, pin_memory: bool | str, device: torch.device | str,
                    local_world_size: int = 1, persistent: bool = True,
                    cpus: int | None = None) -> LoaderSettings:
    """Resolve ``data.num_workers``/``data.pin_memory`` (``auto`` or explicit) for one rank.

    ``auto`` workers: on CUDA, this rank's share of the CPUs (``cpus // local_world_size``) less one
    for the training process itself, between 1 and 16 (a GPU consumes images faster than one core
    decodes and augments them; ``benchmarks/bench_gpu.py --pipeline --variants deepmetric`` measures
    the images per second per core); on CPU, 0: the model already uses every core and decoding is a
    small share of a CPU training step. ``auto``
    pinning: on CUDA. With workers, each keeps 2 batches in flight (PyTorch's default: 15 workers
    hold 30 batches, plenty to smooth decoding times without filling a container's ``/dev/shm``)
    and workers persist across epochs (safe: see the module doc).
    """
    device = torch.device(device)
    if num_workers == "auto":
        if device.type == "cuda":
            share = (cpus or available_cpus()) // max(1, int(local_world_size))
            workers = max(1, min(16, share - 1))
        else:
            workers = 0
    else:
        workers = int(num_workers)
    pin = device.type == "cuda" if pin_memory == "auto" else bool(pin_memory) and device.type == "cuda"
    return LoaderSettings(workers, pin, persistent and workers > 0, 2 if workers else None)



def normalisation_on_device(dataset: Any, setting: bool | str, device: torch.device | str):
    """Resolve ``data.normalize_on_device`` for ``dataset`` (a MetricDataset with a transform Pipeline).

    Returns ``(dataset_view, batch_normalize)``: when on, a view whose transform stops at uint8
    images and the :class:`~deepmetric.data.transforms.BatchNormalize` to apply to each batch once
    it is on ``device``; when off, ``(dataset, None)``. ``auto`` is on for CUDA devices where the
    transform ends in normalisation.

    Raises:
        ParameterError: ``setting`` is True but the transform does not end in normalisation.
    """
    want = torch.device(device).type == "cuda" if setting == "auto" else bool(setting)
    if not want:
        return dataset, None
    split = _split_view(dataset, "split_normalisation")
    if split is None:
        if setting is True:
            raise ParameterError("the transform does not end in float conversion + normalisation (array presets, "
                                 "reid's random erasing); set {setting} to auto or false", "setting")
        return dataset, None
    return split


def _split_view(dataset: Any, method: str):
    """``(view, batch part)`` from the ``method`` of ``dataset``'s transform Pipeline (e.g.
    ``split_normalisation``): the view applies the per-image part; ``None`` where it does not split."""
    split = getattr(getattr(dataset, "transform", None), method, None)
    parts = split() if split is not None else None
    return None if parts is None else (dataset.with_transform(parts[0]), parts[1])


def affine_on_batch(dataset: Any):
    """``(dataset_view, batch_affine)``: when ``dataset``'s transform Pipeline can split its random
    affine (:meth:`~deepmetric.data.transforms.Pipeline.split_affine`), a view whose items are
    ``(image, theta)`` and the :class:`~deepmetric.data.transforms.BatchAffine` that warps and
    normalises each collated batch; otherwise ``(dataset, None)``. The same pixels either way, with
    one ``grid_sample`` per batch instead of one per image (the ``tensor_augment`` preset's main cost)."""
    return _split_view(dataset, "split_affine") or (dataset, None)
