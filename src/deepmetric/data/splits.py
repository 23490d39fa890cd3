"""Class-disjoint splits: the zero-shot protocol of deep metric learning.

Train and test share no class, so test retrieval measures how embeddings generalise to unseen
classes (SOP, CUB and Cars are split this way; so is the quickstart's digits 0-4 / 5-9).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from .base import MetricDataset, SubsetDataset, relabel


def class_split(
    dataset: MetricDataset,
    train_classes: Optional[Iterable[int]] = None,
    test_classes: Optional[Iterable[int]] = None,
    train_fraction: Optional[float] = None,
    relabel_train: bool = True,
) -> tuple[SubsetDataset, SubsetDataset]:
    """Split ``dataset`` by label value into a training view and a test view with disjoint classes.

    Exactly one way of choosing must be given:

    - ``train_classes``: these label values train, all others test;
    - ``test_classes``: these test, all others train;
    - both: each as listed (classes in neither are left out; the lists must not overlap);
    - ``train_fraction`` in (0, 1): the first ``round(fraction * C)`` sorted label values train
      (at least one class on each side), the rest test.

    The training view's labels are relabelled to ``0..C_train-1`` in sorted order of the original
    values when ``relabel_train`` (classification heads need it); the test view keeps the original
    label values. Both are views (:class:`SubsetDataset`) sharing the dataset's files.

    Raises:
        ValueError: no option or conflicting options, a listed class that does not occur in the
            labels, overlapping lists, or a side left with no class.
    """
    labels = dataset.labels
    classes = np.unique(labels)
    if train_fraction is not None:
        if train_classes is not None or test_classes is not None:
            raise ValueError("class_split: give train_fraction or train_classes/test_classes, not both")
        frac = float(train_fraction)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"class_split: train_fraction must be in (0, 1), got {train_fraction}")
        if len(classes) < 2:
            raise ValueError(f"class_split: {dataset.name} has {len(classes)} class(es), need at least 2")
        n_train = min(max(int(round(frac * len(classes))), 1), len(classes) - 1)
        train_set, test_set = classes[:n_train], classes[n_train:]
    elif train_classes is None and test_classes is None:
        raise ValueError("class_split: give train_classes, test_classes or train_fraction")
    else:
        train_set = None if train_classes is None else _known(train_classes, classes, "train_classes", dataset)
        test_set = None if test_classes is None else _known(test_classes, classes, "test_classes", dataset)
        if train_set is None:
            train_set = np.setdiff1d(classes, test_set)
        elif test_set is None:
            test_set = np.setdiff1d(classes, train_set)
        overlap = np.intersect1d(train_set, test_set)
        if len(overlap):
            raise ValueError(f"class_split: classes {overlap.tolist()} are in both train_classes and test_classes")
    if len(train_set) == 0 or len(test_set) == 0:
        raise ValueError(
            f"class_split: the split leaves {'train' if len(train_set) == 0 else 'test'} with no class"
        )
    train_idx = np.flatnonzero(np.isin(labels, train_set))
    test_idx = np.flatnonzero(np.isin(labels, test_set))
    train = dataset.subset(train_idx, name=f"{dataset.name}/train")
    test = dataset.subset(test_idx, name=f"{dataset.name}/test")
    if relabel_train:
        train.labels = relabel(train.labels)
    return train, test


def _known(values: Iterable[int], classes: np.ndarray, option: str, dataset: MetricDataset) -> np.ndarray:
    arr = np.unique(np.asarray(list(values), dtype=np.int64))
    unknown = np.setdiff1d(arr, classes)
    if len(unknown):
        shown = unknown[:10].tolist()
        raise ValueError(
            f"class_split: {option} {shown}{' ...' if len(unknown) > 10 else ''} do not occur in "
            f"{dataset.name} (labels range {classes.min()}..{classes.max()})"
        )
    return arr
