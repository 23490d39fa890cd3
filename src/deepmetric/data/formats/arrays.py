"""In-memory image datasets: scikit-learn's digits and Fashion-MNIST from IDX files."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ...registry import DATASETS
from ..base import DataError, DataSplits, MetricDataset, relabel

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def default_array_transform(x: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W)`` -> float ``(1, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(127.5).sub_(1.0).unsqueeze(0)


class ArrayDataset(MetricDataset):
    """Images held in one uint8 array ``(N, H, W)``; ``load(i)`` returns the ``(H, W)`` array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None,
                 name: str = "arrays", class_names: Optional[Sequence[str]] = None) -> None:
        super().__init__(labels, transform=transform or default_array_transform, name=name)
        self.images = images
        self.class_names = list(class_names) if class_names is not None else None

    def load(self, i: int) -> np.ndarray:
        return self.images[i]


def _split_by_classes(images: np.ndarray, labels: np.ndarray, train_classes: Sequence[int],
                      test_classes: Sequence[int], name: str, train_transform, test_transform) -> DataSplits:
    train_classes, test_classes = list(train_classes), list(test_classes)
    known = set(np.unique(labels).tolist())
    for key, cls in (("train_classes", train_classes), ("test_classes", test_classes)):
        bad = [c for c in cls if c not in known]
        if bad:
            raise DataError(f"data.options.{key}: {name} has no class {bad[0]} (classes: {sorted(known)})")
    overlap = set(train_classes) & set(test_classes)
    if overlap:
        raise DataError(f"data.options: classes {sorted(overlap)} are in both train_classes and test_classes")
    tr = np.isin(labels, train_classes)
    te = np.isin(labels, test_classes)
    train = ArrayDataset(images[tr], relabel(labels[tr]), train_transform, f"{name}-train")
    query = ArrayDataset(images[te], labels[te], test_transform, f"{name}-test")
    return DataSplits(train=train, query=query, info={"train_classes": train_classes, "test_classes": test_classes})


@DATASETS.register("digits")
def digits(root: Optional[str] = None, *, train_transform=None, test_transform=None,
           train_classes: Sequence[int] = (0, 1, 2, 3, 4), test_classes: Sequence[int] = (5, 6, 7, 8, 9)) -> DataSplits:
    """scikit-learn's 1,797 8x8 handwritten digits (real data shipped with scikit-learn).

    The default split trains on digits 0-4 and tests leave-one-out retrieval on the unseen 5-9.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return _split_by_classes(images, d.target.astype(np.int64), train_classes, test_classes, "digits",
                             train_transform, test_transform)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as in LeCun's MNIST format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 8:
                raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic {head.hex()})")
            ndim = head[3]
            dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    expected = int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes of data, expected {expected} for shape {dims})")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST root {root}: missing {stem}[.gz] (expected the four IDX files; "
                    f"install Debian's dataset-fashion-mnist or set data.root)")


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Optional[str] = None, *, train_transform=None, test_transform=None,
                  train_limit: int = 0, test_limit: int = 0) -> DataSplits:
    """Fashion-MNIST from its IDX files: the train split trains, leave-one-out retrieval on the test split.

    ``root`` defaults to Debian's ``/usr/share/datasets/fashion-mnist``; any folder holding
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) works. ``*_limit`` keeps the first N images.
    """
    base = Path(root or FASHION_MNIST_DEFAULT)
    if not base.is_dir():
        raise DataError(f"Fashion-MNIST root {base} does not exist (install Debian's dataset-fashion-mnist or set data.root)")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(base, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(base, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST root {base}: {prefix} images {images.shape} do not match labels {labels.shape}")
        limit = train_limit if split == "train" else test_limit
        if limit:
            images, labels = images[:limit], labels[:limit]
        out[split] = (images, labels)
    train = ArrayDataset(*out["train"], train_transform, "fashion_mnist-train", FASHION_MNIST_CLASSES)
    query = ArrayDataset(*out["test"], test_transform, "fashion_mnist-test", FASHION_MNIST_CLASSES)
    return DataSplits(train=train, query=query, info={"class_names": list(FASHION_MNIST_CLASSES)})
