"""The evaluation protocol around a format's splits: a class split, a validation split, a record.

Deep metric learning measures how embeddings generalise to *unseen* classes (the zero-shot protocol
of SOP, CUB, Cars, In-Shop and re-ID): train and test share no class. Model selection (the ``best``
checkpoint, plateau schedules, early stopping) must not look at the test classes either, so it uses
a validation split whose classes are carved out of the training classes ("A Metric Learning Reality
Check", Musgrave, Belongie and Lim, ECCV 2020).

Every format builder returns :class:`~deepmetric.data.base.DataSplits`; the functions here act on
them, whatever the format:

- :func:`split_classes`: train on some classes, test on the others (``train_classes`` /
  ``test_classes``, lists of class ids or names, or a fraction of the classes);
- :func:`carve_validation`: move ``val_classes`` (a fraction, or a list) of the training classes
  into ``splits.val``, laid out for the recipe's protocol (leave-one-out retrieval; re-ID query and
  gallery by camera; verification pairs);
- :func:`check_training_set`: refuse a training set that cannot train a metric;
- :func:`apply`: all of it in one call, splits in, splits out, from a recipe's ``data`` section;
- :func:`describe_splits`: what a run records in ``splits.json`` (classes, counts, a fingerprint
  of the items) so that an evaluation can check it scores the same test set.

Class ids are the format's own (folder index, CSV label, file id): ``splits.train_class_ids`` maps
the training labels, relabelled ``0..C-1`` for classification heads, back to them.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np

from ..core.errors import ParameterError
from .base import DataError, DataSplits, MetricDataset, VerificationPairs

log = logging.getLogger("deepmetric")

ClassSpec = Union[None, float, Sequence[Union[int, str]]]
_SPLIT_PARAMS = ("train_classes", "test_classes", "val_classes")


class ClassSplitError(ParameterError):
    """A class split that cannot be made; ``param`` names the option at fault (the message starts with it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{{{param}}}: {message}", *dict.fromkeys((param, *_SPLIT_PARAMS)))
        self.param = param


def original_train_labels(splits: DataSplits) -> np.ndarray:
    """The training labels in the format's own class ids."""
    labels = splits.train.labels
    return labels if splits.train_class_ids is None else np.asarray(splits.train_class_ids)[labels]


def resolve_classes(spec: ClassSpec, available: np.ndarray, names: Optional[Dict[int, str]],
                    param: str, among: str = "in the data") -> Optional[np.ndarray]:
    """Class ids from ``spec``: ``None``; a fraction in (0, 1) (the first ``round(f * C)`` sorted
    ids, at least one and at most ``C - 1``); or a list of ids (integers) and names (strings)."""
    if spec is None:
        return None
    available = np.unique(available)
    if isinstance(spec, float) and not isinstance(spec, bool):
        if not 0.0 < spec < 1.0:
            raise ClassSplitError(param, f"a fraction must be in (0, 1), got {spec}")
        if len(available) < 2:
            raise ClassSplitError(param, f"needs at least 2 classes, the data has {len(available)}")
        n = min(max(int(round(spec * len(available))), 1), len(available) - 1)
        return available[:n]
    if isinstance(spec, (str, int)):
        spec = [spec]
    by_name = {v: k for k, v in (names or {}).items()}
    ids, unknown = [], []
    known = set(available.tolist())
    for item in spec:
        if isinstance(item, str) and by_name.get(item) in known:
            ids.append(by_name[item])
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and item in known:
            ids.append(int(item))
        else:
            unknown.append(repr(item))
    if unknown:
        hint = (f"class names such as {', '.join(repr(n) for n in list(by_name)[:3])}, or ids"
                if by_name else "class ids")
        raise ClassSplitError(param, f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                                     f"not {among} ({hint} in {available.min()}..{available.max()})")
    if not ids:
        raise ClassSplitError(param, "the list is empty")
    return np.unique(np.asarray(ids, dtype=np.int64))


def _restrict(ds: Optional[MetricDataset], classes: np.ndarray) -> Optional[MetricDataset]:
    if ds is None:
        return None
    return ds.subset(np.flatnonzero(np.isin(ds.labels, classes)), name=ds.name)


def _set_train(splits: DataSplits, train: MetricDataset, original: np.ndarray) -> None:
    """Install ``train`` (labels in original ids ``original``), relabelled ``0..C-1``."""
    ids, labels = np.unique(original, return_inverse=True)
    train.labels = labels.astype(np.int64)
    splits.train = train
    splits.train_class_ids = ids.astype(np.int64)


def restrict_train(splits: DataSplits, keep: np.ndarray) -> DataSplits:
    """Keep the training images ``keep`` (indices), relabelled, their class ids kept in step."""
    original = original_train_labels(splits)[keep]
    _set_train(splits, splits.train.subset(np.asarray(keep, dtype=np.int64), name=splits.train.name), original)
    return splits


def split_classes(splits: DataSplits, train_classes: ClassSpec = None, test_classes: ClassSpec = None) -> DataSplits:
    """Train on ``train_classes`` and test (query, gallery) on ``test_classes``, disjoint.

    Give either or both; the one left out is every other class. A fraction picks the first
    classes in sorted id order (as the CUB and Cars protocols do). Training images come from the
    format's training pool and test images from its test pool (the same pool for formats with one,
    e.g. an image folder or the digits): Fashion-MNIST with ``train_classes=[0, 1, 2, 3, 4]``
    trains on the five classes of its training file and tests on the other five of its test file.
    """
    if train_classes is None and test_classes is None:
        return splits
    if splits.train is None or splits.query is None:
        raise ClassSplitError("train_classes" if train_classes is not None else "test_classes",
                              "a class split needs a training set and a query set")
    if splits.pairs is not None:
        raise ClassSplitError("test_classes", "a verification format's pairs cannot be split by class")
    tr_labels = original_train_labels(splits)
    te_labels = splits.query.labels if splits.gallery is None else np.concatenate(
        [splits.query.labels, splits.gallery.labels])
    everything = np.union1d(tr_labels, te_labels)
    names = splits.class_names
    train_ids = resolve_classes(train_classes, everything, names, "train_classes")
    test_ids = resolve_classes(test_classes, everything, names, "test_classes")
    if train_ids is None:
        train_ids = np.setdiff1d(everything, test_ids)
    if test_ids is None:
        test_ids = np.setdiff1d(everything, train_ids)
    overlap = np.intersect1d(train_ids, test_ids)
    if len(overlap):
        raise ClassSplitError("test_classes", f"classes {overlap[:10].tolist()} are in both {{train_classes}} and {{test_classes}}")
    keep = np.flatnonzero(np.isin(tr_labels, train_ids))
    if len(keep) == 0:
        raise ClassSplitError("train_classes", "no training image belongs to the training classes")
    _set_train(splits, splits.train.subset(keep, name=splits.train.name), tr_labels[keep])
    splits.query = _restrict(splits.query, test_ids)
    splits.gallery = _restrict(splits.gallery, test_ids)
    if len(splits.query) == 0:
        raise ClassSplitError("test_classes", "no test image belongs to the test classes")
    return splits


def carve_validation(splits: DataSplits, val_classes: ClassSpec, *, layout: str = "retrieval", seed: int = 0,
                     transform: Optional[Callable] = None, min_train_classes: int = 2,
                     per_class: Optional[int] = None) -> DataSplits:
    """Move the images of ``val_classes`` from the training set into ``splits.val``.

    ``val_classes``: a fraction of the training classes (``max(2, round(f * C))`` classes, drawn by
    a permutation seeded with ``seed``: the same classes for every run seed), or a list of class
    ids or names. ``transform`` is the evaluation transform the validation images get (default: the
    query set's). ``layout`` lays the validation images out for the recipe's protocol:

    - ``retrieval``: leave-one-out retrieval on the validation images;
    - ``reid`` (needs camera ids): the first image of each (identity, camera) queries a gallery of
      all validation images; the re-ID rule removes a query's own camera, the query included;
    - ``verification``: matched and unmatched pairs of validation images, balanced, in 10 folds
      (:func:`verification_pairs`).

    ``per_class``: at most this many images of each validation class are scored (drawn with ``seed``;
    the others still leave the training set).
    """
    if val_classes is None:
        return splits
    if splits.train is None:
        raise ClassSplitError("val_classes", "a validation split is carved from a training set, and there is none")
    original = original_train_labels(splits)
    classes = np.unique(original)
    if isinstance(val_classes, float) and not isinstance(val_classes, bool):
        if not 0.0 < val_classes < 1.0:
            raise ClassSplitError("val_classes", f"a fraction must be in (0, 1), got {val_classes}")
        n = max(2, int(round(val_classes * len(classes))))
        val_ids = np.sort(np.random.default_rng(seed).permutation(classes)[:n])
    else:
        val_ids = resolve_classes(val_classes, classes, splits.class_names, "val_classes", "among the training classes")
    left = len(classes) - len(val_ids)
    if len(val_ids) < 2 or left < min_train_classes:
        raise ClassSplitError("val_classes", f"{len(val_ids)} of the {len(classes)} training classes would leave "
                                             f"{left} to train on (needs >= {min_train_classes}) and {len(val_ids)} "
                                             f"to validate on (needs >= 2)")
    in_val = np.isin(original, val_ids)
    scored = np.flatnonzero(in_val)
    if per_class is not None:
        rng = np.random.default_rng(seed)
        scored = np.sort(np.concatenate([rng.permutation(np.flatnonzero(original == c))[:per_class] for c in val_ids]))
    pool = splits.train.subset(scored, name=f"{splits.train.name}/val")
    pool.labels = original[scored]
    eval_tf = transform if transform is not None else getattr(splits.query, "transform", splits.train.transform)
    pool = pool.with_transform(eval_tf)
    _set_train(splits, splits.train.subset(np.flatnonzero(~in_val), name=splits.train.name), original[~in_val])
    splits.val = validation_layout(pool, layout, seed)
    return splits


def check_training_set(splits: DataSplits, data: Any) -> DataSplits:
    """Refuse training sets that cannot train a metric: empty, or (for the P x K sampler, which would
    repeat them K times) classes with a single image, unless ``data.drop_singletons`` (then they go).
    Random batches keep such classes, as the seeds that sample at random do: there they are
    negatives for the others and samples for proxy losses. ``data``: a recipe's ``data`` section."""
    train = splits.train
    if train is None or len(train) == 0:
        raise DataError(f"data: the training set of format '{data.format}' (root {data.root}) is empty")
    classes, counts = np.unique(train.labels, return_counts=True)
    single = classes[counts == 1]
    if len(single) and data.sampler == "random" and not data.drop_singletons:
        log.warning("%d training classes have a single image and never form a positive pair "
                    "(kept by data.sampler=random; data.drop_singletons=true removes them)", len(single))
        return splits
    if len(single):
        if not data.drop_singletons:
            where = ""
            if train.paths is not None:
                where = f" ({train.paths[int(np.flatnonzero(train.labels == single[0])[0])]})"
            raise DataError(f"data: training class {int(single[0])}{where} has only one image "
                            f"({len(single)} such classes); metric learning needs >= 2 per class: "
                            f"remove them or set data.drop_singletons=true")
        keep = np.flatnonzero(~np.isin(train.labels, single))
        log.warning("dropped %d single-image training classes (data.drop_singletons)", len(single))
        restrict_train(splits, keep)
    return splits


def apply(splits: DataSplits, data: Any, *, layout: str = "retrieval", eval_transform: Optional[Callable] = None,
          class_split: bool = True, training: bool = True) -> DataSplits:
    """The zero-shot protocol of a recipe's ``data`` section on a format's splits, in one call:

    1. the class split, ``data.train_classes`` / ``data.test_classes`` (:func:`split_classes`; with
       ``class_split`` false, splits a user made in Python are taken as given);
    2. with ``training``, the validation split ``data.val_classes`` drawn with ``data.val_seed`` and
       laid out for the protocol ``layout`` (:func:`carve_validation`; unless ``splits.val`` is set),
       leaving the P x K sampler at least ``data.classes_per_batch`` classes to train on;
    3. with ``training``, the checks of :func:`check_training_set`.

    An evaluation of a trained model needs none of 2 and 3 (``training=False``).
    """
    if class_split:
        splits = split_classes(splits, data.train_classes, data.test_classes)
    if not training:
        return splits
    if splits.val is None:
        min_train = max(2, data.classes_per_batch) if data.sampler == "pk" else 2  # a P x K batch needs P classes
        splits = carve_validation(splits, data.val_classes, layout=layout, seed=data.val_seed,
                                  transform=eval_transform, min_train_classes=min_train,
                                  per_class=data.val_per_class)
    return check_training_set(splits, data)


def validation_layout(pool: MetricDataset, layout: str, seed: int = 0) -> DataSplits:
    """The validation images as an evaluation split for ``layout`` (see :func:`carve_validation`)."""
    if layout == "retrieval":
        return DataSplits(train=None, query=pool)
    if layout == "reid":
        if pool.camids is None:
            raise ClassSplitError("val_classes", "the re-ID protocol needs camera ids, and the training images have none")
        key = pool.labels * (int(pool.camids.max()) + 1) + pool.camids
        _, first = np.unique(key, return_index=True)
        query = pool.subset(np.sort(first), name=f"{pool.name}/query")
        return DataSplits(train=None, query=query, gallery=pool.subset(np.arange(len(pool)), name=f"{pool.name}/gallery"))
    if layout == "verification":
        left, right, same, fold = verification_pairs(pool.labels, seed=seed)
        return DataSplits(train=None, pairs=VerificationPairs(pool, left, right, same, fold))
    raise ClassSplitError("val_classes", f"unknown layout '{layout}' (retrieval, reid or verification)")


def verification_pairs(labels: np.ndarray, n_folds: int = 10, max_pairs: int = 6000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Balanced matched / unmatched pairs over images with ``labels``, ordered fold by fold.

    ``max_pairs / 2`` matched pairs (fewer if the classes have fewer), spread as evenly as their
    sizes allow over the classes with two or more images, and as many unmatched pairs (two images of
    different classes); no pair twice; all drawn with ``seed``. Pair ``j`` of each kind is in fold
    ``j * n_folds // N`` and the folds are contiguous (as LFW's ``pairs.txt``), each half matched.
    Returns ``left, right, is_same, fold``.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    groups = [g for g in groups if len(g) >= 2]
    if not groups or len(np.unique(labels)) < 2:
        raise ClassSplitError("val_classes", "verification pairs need >= 2 classes and a class with >= 2 images")
    # water-filling: every class gets an equal share, small classes give their surplus to the others
    capacity = np.array([len(g) * (len(g) - 1) // 2 for g in groups])
    quota = np.zeros(len(groups), dtype=np.int64)
    left_over = min(max_pairs // 2, int(capacity.sum()))
    while left_over > 0:
        open_ = np.flatnonzero(quota < capacity)
        share = max(1, left_over // len(open_))
        for i in rng.permutation(open_):
            take = min(share, capacity[i] - quota[i], left_over)
            quota[i] += take
            left_over -= take
            if left_over == 0:
                break
    matched = [p for g, q in zip(groups, quota) if q for p in _distinct_pairs(g, int(q), rng)]
    unmatched: set = set()
    while len(unmatched) < len(matched):
        a, b = (int(x) for x in rng.integers(0, len(labels), size=2))
        if labels[a] != labels[b] and (b, a) not in unmatched:
            unmatched.add((a, b))
    m = np.asarray(matched, np.int64)[rng.permutation(len(matched))]
    u = np.asarray(sorted(unmatched), np.int64)[rng.permutation(len(unmatched))]
    n = len(m)
    fold_of = np.arange(n) * n_folds // n
    order = np.argsort(np.concatenate([fold_of, fold_of]), kind="stable")
    pairs = np.concatenate([m, u])[order]
    same = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])[order]
    fold = np.concatenate([fold_of, fold_of])[order]
    return pairs[:, 0], pairs[:, 1], same, fold


def _distinct_pairs(members: np.ndarray, count: int, rng: np.random.Generator) -> list:
    """``count`` distinct unordered pairs of ``members``."""
    n = len(members)
    if n * (n - 1) // 2 <= 50_000:  # enumerate, then choose
        i, j = np.triu_indices(n, k=1)
        pick = rng.choice(len(i), size=count, replace=False)
        return [(int(members[i[p]]), int(members[j[p]])) for p in pick]
    seen: set = set()
    while len(seen) < count:
        a, b = sorted(int(x) for x in rng.choice(n, size=2, replace=False))
        seen.add((a, b))
    return [(int(members[a]), int(members[b])) for a, b in sorted(seen)]


# -- the record a run keeps ---------------------------------------------------------------------------

def _fingerprint(ds: MetricDataset, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if ds.camids is not None:
        h.update(b"camids" + np.ascontiguousarray(ds.camids, dtype=np.int64).tobytes())
    if ds.paths is not None:
        h.update("\n".join(ds.paths).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _describe(ds: Optional[MetricDataset], labels: Optional[np.ndarray] = None) -> Optional[Dict[str, Any]]:
    if ds is None:
        return None
    labels = ds.labels if labels is None else labels
    classes = np.unique(labels)
    return {"images": int(len(ds)), "classes": int(len(classes)), "class_ids": classes.tolist(),
            "fingerprint": _fingerprint(ds, labels)}


def _describe_eval(s: Optional[DataSplits]) -> Optional[Dict[str, Any]]:
    if s is None:
        return None
    out: Dict[str, Any] = {"query": _describe(s.query), "gallery": _describe(s.gallery)}
    if s.pairs is not None:
        p = s.pairs
        out["pairs"] = {"pairs": int(len(p.left)), "matched": int(np.sum(p.is_same)),
                        "images": _describe(p.images)}
    return {k: v for k, v in out.items() if v is not None}


def describe_splits(splits: DataSplits) -> Dict[str, Any]:
    """Classes, counts and a fingerprint (labels, camera ids, paths) of every split, in original ids."""
    return {
        "train": None if splits.train is None else _describe(splits.train, original_train_labels(splits)),
        "val": _describe_eval(splits.val),
        "test": _describe_eval(splits),
    }


def split_differences(recorded: Dict[str, Any], current: Dict[str, Any], part: str = "test") -> list[str]:
    """Readable differences between two :func:`describe_splits` records, for ``part``."""
    a, b = recorded.get(part) or {}, current.get(part) or {}
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x != y:
            then, now = _summary(x), _summary(y)
            same = " (the same counts, other items)" if then == now else ""
            out.append(f"{part} {key}: {then} when trained, {now} now{same}")
    return out


def _summary(rec: Optional[Dict[str, Any]]) -> str:
    if rec is None:
        return "none"
    if "pairs" in rec:
        return f"{rec['pairs']} pairs of {rec['images']['images']} images"
    return f"{rec['images']} images of {rec['classes']} classes"
