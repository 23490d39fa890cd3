"""The dataset abstraction every on-disk format produces.

A :class:`MetricDataset` yields ``(image, label, index)``; per-sample metadata (camera id, path)
lives in arrays on the dataset, so a loader never has to collate dictionaries and an evaluator can
pick up ``dataset.camids[indices]`` directly. Labels are ``int64`` end to end.

A format builder (``@DATASETS.register("name")``) returns :class:`DataSplits`: the training set,
the query set, and a gallery set (``None`` means leave-one-out retrieval on the query set, the
SOP/CUB/Cars protocol), or verification pairs (the LFW protocol).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import ParameterError


class DataError(ParameterError):
    """Bad data on disk: the message names the file or folder and what was expected (and, as a
    :class:`ParameterError`, the builder's parameter to change, such as ``{root}``)."""


class MetricDataset(Dataset):
    """Base class: subclasses implement :meth:`load` (raw image for index ``i``).

    Args:
        labels: ``(N,)`` integer class ids (converted to int64).
        camids: optional ``(N,)`` camera ids (re-ID); ``None`` elsewhere.
        paths: optional list of N file paths (for reports, search results and error messages).
        transform: callable applied to what :meth:`load` returns; must produce a tensor.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        camids: Optional[Sequence[int] | np.ndarray] = None,
        paths: Optional[Sequence[str]] = None,
        transform: Optional[Callable[[Any], torch.Tensor]] = None,
        name: str = "dataset",
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.camids = None if camids is None else np.asarray(camids, dtype=np.int64).reshape(-1)
        self.paths = None if paths is None else [str(p) for p in paths]
        self.transform = transform
        self.name = name
        n = len(self.labels)
        if self.camids is not None and len(self.camids) != n:
            raise ValueError(f"{name}: {len(self.camids)} camera ids for {n} labels")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"{name}: {len(self.paths)} paths for {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, i: int, decoder: str = "pil", channels: Optional[int] = None) -> Any:
        """What :meth:`__getitem__` feeds the transform: :meth:`load`, unless the transform takes
        tensors (its ``decoder`` is ``"torchvision"``) and the format can decode straight into one
        (image files: a uint8 ``(3, H, W)`` tensor, see :func:`~deepmetric.data.io.read_image_tensor`;
        ``channels``, the transform's, lets a greyscale file come as its one channel)."""
        return self.load(i)

    def __getitem__(self, i: int):
        t = self.transform
        x = self.read(int(i), getattr(t, "decoder", "pil"), getattr(t, "channels", None))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i]), int(i)

    @property
    def num_classes(self) -> int:
        return int(len(np.unique(self.labels)))

    def subset(self, indices: np.ndarray, name: Optional[str] = None) -> "SubsetDataset":
        return SubsetDataset(self, np.asarray(indices, dtype=np.int64), name=name or self.name)

    def with_transform(self, transform: Optional[Callable[[Any], torch.Tensor]]) -> "MetricDataset":
        """A shallow copy that applies ``transform`` (train and test views of the same files)."""
        import copy

        other = copy.copy(self)
        other.transform = transform
        return other


class SubsetDataset(MetricDataset):
    """A view of ``base`` restricted to ``indices`` (labels, camids and paths follow)."""

    def __init__(self, base: MetricDataset, indices: np.ndarray, name: str = "subset") -> None:
        self.base = base
        self.indices = indices
        super().__init__(
            base.labels[indices],
            None if base.camids is None else base.camids[indices],
            None if base.paths is None else [base.paths[i] for i in indices],
            transform=base.transform,
            name=name,
        )

    def load(self, i: int) -> Any:
        return self.base.load(int(self.indices[i]))

    def read(self, i: int, decoder: str = "pil", channels: Optional[int] = None) -> Any:
        return self.base.read(int(self.indices[i]), decoder, channels)


@dataclass
class VerificationPairs:
    """Face-verification pairs over an image set: pair ``j`` is ``(left[j], right[j])``.

    ``is_same[j]`` is True for a matched pair. ``fold`` is the official fold of each pair
    (LFW ``pairs.txt`` has 10 sets), or ``None`` for contiguous folds.
    """

    images: MetricDataset
    left: np.ndarray
    right: np.ndarray
    is_same: np.ndarray
    fold: Optional[np.ndarray] = None


@dataclass
class DataSplits:
    """What a format builder returns, and what the evaluation protocol adds to it.

    ``gallery is None`` means leave-one-out retrieval on ``query`` (each query excluded by index).
    ``pairs`` is set for verification protocols. ``train`` labels are ``0..C-1`` (classification
    heads are sized from :attr:`num_classes`); ``train_class_ids[label]`` is the format's own class
    id of a training label (``None``: the labels are the ids). Query and gallery keep the format's
    ids. ``class_names`` maps a class id to its name where the format has names (folders, CSV
    labels, characters). ``val`` is the validation split carved from the training classes
    (:func:`deepmetric.data.protocol.carve_validation`), itself a ``DataSplits`` with no ``train``.
    """

    train: Optional[MetricDataset]
    query: Optional[MetricDataset] = None
    gallery: Optional[MetricDataset] = None
    pairs: Optional[VerificationPairs] = None
    train_class_ids: Optional[np.ndarray] = None
    class_names: Optional[Dict[int, str]] = None
    val: Optional["DataSplits"] = None

    @property
    def num_classes(self) -> int:
        return 0 if self.train is None else self.train.num_classes


def relabel(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary class ids to ``0..C-1`` in sorted order (classification heads need it)."""
    _, inv = np.unique(np.asarray(labels), return_inverse=True)
    return inv.astype(np.int64)
