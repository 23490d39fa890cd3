"""``data.cache``: each image's decoded, resized input kept in memory after its first use.

A training step on a small network spends as much time decoding and resizing its batch as it spends
in the network (a 32 x 32 glyph PNG: about 0.75 ms to decode and resize on one CPU thread, 48 ms of
a 150 ms step of 64 images), and every evaluation decodes its whole split again. The part of a
transform pipeline that draws nothing at random (decode, channel conversion, resize, normalisation:
:func:`deterministic_prefix`) gives the same tensor every time, so :class:`CachedDataset` computes it
once per image and keeps it; the random steps after it (an affine draw, erasing) still run on every
read. The items are the very tensors the pipeline gives, so a run with the cache is the run without
it, bit for bit (``tests/data/test_cache.py``); only the time differs.

:class:`InputCache` holds the stores of one run (the training images, each evaluation split) under
one memory limit (``data.cache``: ``auto``, a quarter of the machine's memory and at most
:data:`AUTO_LIMIT_GB` GiB; a number of GiB; or ``false``). Items past the limit are computed on every
read, as without a cache. It lives in the process that reads the data: with loader workers
(``data.num_workers`` > 0, CUDA's default) they decode in parallel and no cache is made.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torchvision.transforms.v2 as T

from .base import MetricDataset
from .transforms import ArrayToTensor, Pipeline, TestInput, ToChannels, ToFloat, ToUint8

#: the steps that draw nothing at random: the same input gives the same output every time
DETERMINISTIC = (ArrayToTensor, ToChannels, ToFloat, ToUint8, TestInput, T.Resize, T.Normalize, T.CenterCrop,
                 T.Grayscale, T.ToDtype)
#: ``data.cache: auto``: a quarter of the machine's memory, at most this many GiB
AUTO_LIMIT_GB = 4.0


def cache_limit(setting: Any) -> int:
    """``data.cache`` in bytes: ``auto`` (a quarter of the physical memory, at most
    :data:`AUTO_LIMIT_GB` GiB), a number of GiB, or ``False``/0 (no cache)."""
    if setting is False or setting is None:
        return 0
    if setting == "auto" or setting is True:
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not every platform reports it
            physical = 4 * 2 ** 30
        return int(min(AUTO_LIMIT_GB * 2 ** 30, physical / 4))
    return int(float(setting) * 2 ** 30)


def deterministic_prefix(transform: Any) -> Optional[Tuple[Callable, Optional[Callable]]]:
    """``(prefix, rest)`` of a transform :class:`~deepmetric.data.transforms.Pipeline`: its leading
    steps that draw nothing at random (:data:`DETERMINISTIC`), and the steps after them (``None`` when
    there are none); ``None`` when the pipeline starts with a random step, or is not a Pipeline (a
    callable of your own, which may draw)."""
    if not isinstance(transform, Pipeline):
        return None
    steps = list(transform.transforms)
    k = 0
    while k < len(steps) and type(steps[k]) in DETERMINISTIC:
        k += 1
    if k == 0:
        return None
    rest = T.Compose(steps[k:]) if k < len(steps) else None
    return T.Compose(steps[:k]), rest


class CacheStats:
    """What a store did: ``misses`` (items computed) and ``miss_s`` (the seconds they took), ``hits``."""

    def __init__(self) -> None:
        self.misses, self.miss_s, self.hits = 0, 0.0, 0


class _Store:
    def __init__(self, n: int) -> None:
        self.items: List[Optional[torch.Tensor]] = [None] * n
        self.stats = CacheStats()

    @property
    def filled(self) -> int:
        return sum(x is not None for x in self.items)


class InputCache:
    """The stores of one run under one memory limit (see the module docstring)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self.used = 0
        self.stores: Dict[str, _Store] = {}
        #: the clock misses are timed by (the trainer's budget clock)
        self.clock: Callable[[], float] = time.perf_counter

    @classmethod
    def from_setting(cls, setting: Any) -> Optional["InputCache"]:
        limit = cache_limit(setting)
        return cls(limit) if limit > 0 else None

    def wrap(self, dataset: MetricDataset, key: str) -> MetricDataset:
        """``dataset`` read through the store ``key`` (made on first use, shared by later wraps of the
        same split), or ``dataset`` itself where its transform has no deterministic prefix."""
        split = deterministic_prefix(getattr(dataset, "transform", None))
        if split is None or not isinstance(dataset, MetricDataset):
            return dataset
        store = self.stores.get(key)
        if store is None or len(store.items) != len(dataset):
            store = self.stores[key] = _Store(len(dataset))
        return CachedDataset(dataset, split[0], split[1], store, self)

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def stats(self, key: str) -> Optional[CacheStats]:
        store = self.stores.get(key)
        return None if store is None else store.stats

    def left_to_fill(self, key: str) -> int:
        """Items of store ``key`` not computed yet."""
        store = self.stores.get(key)
        return 0 if store is None else len(store.items) - store.filled

    def fits(self, key: str) -> bool:
        """Whether every item of store ``key`` fits in the memory left, at the size of those stored."""
        store = self.stores.get(key)
        if store is None or store.filled == 0:
            return False
        per_item = self._bytes_per_item(store)
        return self.used + per_item * (len(store.items) - store.filled) <= self.limit

    @staticmethod
    def _bytes_per_item(store: _Store) -> float:
        sizes = [x.element_size() * x.numel() for x in store.items if x is not None][:64]
        return sum(sizes) / max(1, len(sizes))


class CachedDataset(MetricDataset):
    """``base`` whose items' deterministic part (``prefix``) is computed once and kept in ``store``;
    ``rest`` (the random steps) runs on every read. See :meth:`InputCache.wrap`."""

    def __init__(self, base: MetricDataset, prefix: Callable, rest: Optional[Callable], store: _Store,
                 cache: InputCache) -> None:
        super().__init__(base.labels, base.camids, base.paths, transform=base.transform, name=base.name)
        self.base, self.prefix, self.rest, self.store, self.cache = base, prefix, rest, store, cache
        t = base.transform
        self._decoder, self._channels = getattr(t, "decoder", "pil"), getattr(t, "channels", None)

    def load(self, i: int) -> Any:
        return self.base.load(i)

    def read(self, i: int, decoder: str = "pil", channels: Optional[int] = None) -> Any:
        return self.base.read(i, decoder, channels)

    def __getitem__(self, i):
        i = int(i)
        x = self.store.items[i]
        stats = self.store.stats
        if x is None:
            t0 = self.cache.clock()
            x = self.prefix(self.base.read(i, self._decoder, self._channels))
            if torch.is_tensor(x) and self.cache.take(x.element_size() * x.numel()):
                self.store.items[i] = x
            stats.misses += 1
            stats.miss_s += self.cache.clock() - t0
        else:
            stats.hits += 1
        if self.rest is not None:
            x = self.rest(x)
        return x, int(self.labels[i]), i

    def with_transform(self, transform: Optional[Callable[[Any], torch.Tensor]]) -> MetricDataset:
        """Another transform reads the files again: ``base`` with it, without this cache."""
        return self.base.with_transform(transform)

    def subset(self, indices, name: Optional[str] = None):
        return self.base.subset(indices, name)


__all__ = ["AUTO_LIMIT_GB", "CacheStats", "CachedDataset", "InputCache", "cache_limit", "deterministic_prefix"]
