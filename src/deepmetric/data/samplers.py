"""Batch samplers for training: ``PKBatchSampler`` (P classes x K samples) and ``RandomBatchSampler``
(plain shuffled batches). Both are deterministic in ``(seed, epoch)``, shard whole batches across
ranks, and resume inside an epoch with :meth:`skip`.

``PKBatchSampler``: batches of P classes x K samples that cover every sample each epoch.
The rule, per epoch (all randomness from ``seed`` and the epoch number, so every rank draws the same
plan):

1. Each class's indices are shuffled and cut into chunks of K. A class with fewer than K samples, or
   a last chunk shorter than K, is topped up by drawing more of that class's own samples at random
   (with replacement when the class has fewer than K). Every top-up draw is counted in
   ``stats["resampled"]``; a class with one sample is repeated K times, which still gives no positive
   pair, so such classes are better filtered out of the data (``stats["singleton_classes"]``).
2. Batches are formed by repeatedly picking P distinct classes, with probability proportional to
   their remaining chunk counts (as research-xbm and PaddleClas do), and taking one chunk from each.
3. When fewer than P classes still have chunks, the last batches are completed with chunks drawn at
   random from other classes (``stats["filler_chunks"]``), so no sample is ever dropped.
4. With ``world_size > 1`` the plan is padded with extra random batches to a multiple of
   ``world_size`` and rank r takes batches r, r + W, r + 2W, ...: ranks never share a batch, and
   together they cover every sample.

Iteration yields lists of dataset indices of length P*K, laid out class by class
(``[c1]*K + [c2]*K + ...``), the layout the PaddlePaddle and Centroids-ReID losses expect.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..core.errors import ParameterError


class _EpochBatches(Sampler[List[int]]):
    """Shared protocol: this rank's share (every W-th) of the epoch's global batches, ``set_epoch``
    and ``skip`` (resume inside an epoch). Subclasses give ``_global_batches(epoch)``."""

    epoch: int
    rank: int
    world_size: int
    _skip: int

    def _global_batches(self, epoch: int) -> Sequence[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[List[int]]:
        mine = self._global_batches(self.epoch)[self.rank::self.world_size]
        start, self._skip = self._skip, 0
        for batch in mine[start:]:
            yield batch.tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, batches: int) -> None:
        """Start the next iteration ``batches`` batches into the current epoch (resume)."""
        self._skip = int(batches)


class PKBatchSampler(_EpochBatches):
    def __init__(self, labels: Sequence[int] | np.ndarray, classes_per_batch: int, samples_per_class: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ParameterError("{classes_per_batch} and {samples_per_class} must be >= 1",
                                 "classes_per_batch", "samples_per_class")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.P, self.K = int(classes_per_batch), int(samples_per_class)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        classes, inverse = np.unique(labels, return_inverse=True)
        if len(classes) < self.P:
            raise ParameterError(f"{{classes_per_batch}}={self.P} but the training set has only {len(classes)} "
                                 "classes; lower {classes_per_batch}", "classes_per_batch")
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))
        self._members: List[np.ndarray] = np.split(order, bounds[:-1])
        self.num_samples = len(labels)
        self.epoch = 0
        self._skip = 0
        self.stats: Dict[str, int] = {}
        self._plan_cache: tuple[int, List[np.ndarray]] | None = None

    # -- plan --------------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> List[np.ndarray]:
        """All batches of this epoch (before sharding), deterministic in ``(seed, epoch)``."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        P, K = self.P, self.K
        resampled = 0
        chunks: List[List[np.ndarray]] = []
        for members in self._members:
            idx = rng.permutation(members)
            short = (-len(idx)) % K
            if short:
                extra = rng.choice(members, size=short, replace=len(members) < short or len(members) < K)
                idx = np.concatenate([idx, extra])
                resampled += short
            chunks.append(list(idx.reshape(-1, K)))
        remaining = np.array([len(c) for c in chunks], dtype=np.int64)
        batches: List[np.ndarray] = []
        filler = 0
        while remaining.sum() > 0:
            avail = np.flatnonzero(remaining)
            if len(avail) >= P:
                picked = rng.choice(avail, size=P, replace=False, p=remaining[avail] / remaining[avail].sum())
                parts = [chunks[c][len(chunks[c]) - remaining[c]] for c in picked]
                remaining[picked] -= 1
            else:
                parts = [chunks[c][len(chunks[c]) - remaining[c]] for c in avail]
                remaining[avail] -= 1
                others = np.setdiff1d(np.arange(len(chunks)), avail)
                for c in rng.choice(others, size=P - len(avail), replace=False):
                    parts.append(chunks[c][rng.integers(len(chunks[c]))])
                    filler += 1
            batches.append(np.concatenate(parts))
        pad = (-len(batches)) % self.world_size
        for _ in range(pad):
            picked = rng.choice(len(chunks), size=P, replace=False)
            batches.append(np.concatenate([chunks[c][rng.integers(len(chunks[c]))] for c in picked]))
        self.stats = {
            "resampled": int(resampled),
            "filler_chunks": int(filler),
            "padding_batches": int(pad),
            "singleton_classes": int(sum(len(m) == 1 for m in self._members)),
        }
        self._plan_cache = (epoch, batches)
        return batches

    # -- Sampler protocol ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._plan(self.epoch)) // self.world_size

    def _global_batches(self, epoch: int) -> List[np.ndarray]:
        return self._plan(epoch)


class RandomBatchSampler(_EpochBatches):
    """Plain random batches: each epoch one permutation of all ``num_samples`` indices, cut into
    consecutive chunks of ``batch_size`` (what ``DataLoader(shuffle=True, drop_last=True)`` draws,
    as Proxy-Anchor and Paddle's stage-one reader do). Classes are not balanced, so a batch may hold
    no positive pair; pair losses then warn and return zero.

    The epoch keeps ``num_chunks // world_size * world_size`` chunks (drop_last; the dropped count is
    ``stats["dropped"]``) and rank r takes chunks r, r + W, r + 2W, ...: global step t is chunks
    ``tW .. tW + W - 1``, i.e. the same images, in the same order, as one process drawing batches of
    ``W * batch_size``. Ranks never share an image within an epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise ParameterError("{batch_size} must be >= 1", "batch_size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if num_samples < batch_size * world_size:
            raise ParameterError(f"{{batch_size}}={batch_size} x {world_size} process(es) but the training set "
                                 f"has only {num_samples} images; lower {{batch_size}}", "batch_size")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._skip = 0
        per_step = self.batch_size * self.world_size
        self.stats: Dict[str, int] = {"dropped": self.num_samples - self.num_samples // per_step * per_step}

    def _order(self, epoch: int) -> np.ndarray:
        """The kept part of this epoch's permutation, ``(steps * W * batch_size,)`` int64."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return perm[: len(self) * self.world_size * self.batch_size]

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def _global_batches(self, epoch: int) -> np.ndarray:
        return self._order(epoch).reshape(-1, self.batch_size)
