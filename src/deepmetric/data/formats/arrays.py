"""In-memory image datasets: scikit-learn's digits and Fashion-MNIST from IDX files."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..base import DataError, DataSplits, MetricDataset

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def default_array_transform(x: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W)`` -> float ``(1, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(127.5).sub_(1.0).unsqueeze(0)


class ArrayDataset(MetricDataset):
    """Images held in one uint8 array ``(N, H, W)``; ``load(i)`` returns the ``(H, W)`` array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None,
                 name: str = "arrays", class_names: Optional[Sequence[str]] = None,
                 camids: Optional[np.ndarray] = None) -> None:
        super().__init__(labels, camids=camids, transform=transform or default_array_transform, name=name)
        self.images = images
        self.class_names = list(class_names) if class_names is not None else None

    def load(self, i: int) -> np.ndarray:
        return self.images[i]


def digits(root: Optional[str] = None, *, train_transform=None, test_transform=None) -> DataSplits:
    """scikit-learn's 1,797 8x8 handwritten digits (real data shipped with scikit-learn).

    One pool: every digit trains and is queried leave-one-out. For the zero-shot protocol split the
    classes with ``data.train_classes`` (e.g. ``[0, 1, 2, 3, 4]``: the unseen 5-9 are queried).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    return DataSplits(train=ArrayDataset(images, labels, train_transform, "digits-train"),
                      query=ArrayDataset(images, labels, test_transform, "digits-test"),
                      class_names={c: str(c) for c in range(10)})


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
                    "install Debian's dataset-fashion-mnist or set {root})", "root")


def fashion_mnist(root: Optional[str] = None, *, train_transform=None, test_transform=None,
                  train_limit: int = 0, test_limit: int = 0) -> DataSplits:
    """Fashion-MNIST from its IDX files: the train split trains, leave-one-out retrieval on the test split.

    ``root`` defaults to Debian's ``/usr/share/datasets/fashion-mnist``; any folder holding
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) works. ``*_limit`` keeps the first N images.
    """
    base = Path(root or FASHION_MNIST_DEFAULT)
    if not base.is_dir():
        raise DataError(f"Fashion-MNIST root {base} does not exist (install Debian's dataset-fashion-mnist or set "
                        "{root})", "root")
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
    return DataSplits(train=train, query=query,
                      class_names=dict(enumerate(FASHION_MNIST_CLASSES)))
