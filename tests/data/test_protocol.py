"""The evaluation protocol on every format: class split, validation split carved from the training
classes (class-disjoint from train and test), its layout per protocol, and the record of a run's splits."""
from __future__ import annotations

import numpy as np
import pytest

from deepmetric.config import ConfigError, load_config
from deepmetric.data import synthetic
from deepmetric.data.formats.arrays import ArrayDataset
from deepmetric.data.base import DataSplits
from deepmetric.data.protocol import (ClassSplitError, carve_validation, describe_splits, original_train_labels,
                                      split_classes, split_differences, verification_pairs)
from deepmetric.engine.build import build_data

# (format, root key in the `mini` fixture, eval.protocol)
FORMATS = [
    ("image_folder", "image_folder", "retrieval"),
    ("csv", "csv", "retrieval"),
    ("csv", "csv_test", "retrieval"),
    ("csv", "csv_qg", "retrieval"),
    ("sop", "sop", "retrieval"),
    ("cub", "cub", "retrieval"),
    ("cars", "cars", "retrieval"),
    ("inshop", "inshop", "retrieval"),
    ("market1501", "market", "reid"),
    ("dukemtmc", "duke", "reid"),
    ("identity_folder", "image_folder", "verification"),
    ("digits", None, "retrieval"),
    ("glyphs", None, "retrieval"),
]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The official layouts with enough classes for 2 validation + 2 training classes."""
    base = tmp_path_factory.mktemp("layouts")
    return {
        "image_folder": synthetic.make_image_folder(base / "folder", n_classes=8, per_class=3, size=8),
        "csv": synthetic.make_csv(base / "csv", n_classes=8, per_class=3, split=None, string_labels=True, size=8),
        "csv_test": synthetic.make_csv(base / "csv_test", n_classes=10, per_class=3, split="test", size=8),
        "csv_qg": synthetic.make_csv(base / "csv_qg", n_classes=10, per_class=3, split="query_gallery", size=8),
        "sop": synthetic.make_sop(base / "sop", n_classes=10, per_class=2, n_super_classes=2, size=8),
        "cub": synthetic.make_cub(base / "cub", n_classes=10, per_class=2, size=8),
        "cars": synthetic.make_cars(base / "cars", n_classes=10, per_class=2, size=8),
        "inshop": synthetic.make_inshop(base / "inshop", n_items=10, per_item=3, size=8),
        "market": synthetic.make_market(base / "market", n_ids=10, per_id=3, n_distractors=1, n_junk=1),
        "duke": synthetic.make_market(base / "duke", n_ids=10, per_id=3, n_cams=8, style="duke"),
    }


def _classes(ds):
    return set() if ds is None else set(np.unique(ds.labels).tolist())


def _build(fmt, root, protocol, *extra):
    over = [f"data.format={fmt}", "data.options={}", "data.classes_per_batch=2", f"eval.protocol={protocol}",
            "data.val_classes=0.34", *extra]
    if root is not None:
        over.append(f"data.root={root}")
    if protocol == "verification":
        over.append("eval.metric=accuracy")
    return build_data(load_config(None, over))


@pytest.mark.parametrize("fmt,key,protocol", FORMATS, ids=[f"{f}-{k}" for f, k, _ in FORMATS])
def test_validation_split_is_class_disjoint_from_train_and_test(layouts, fmt, key, protocol):
    one_pool = (fmt in ("image_folder", "digits", "glyphs") or key == "csv") and protocol == "retrieval"
    extra = ["data.train_classes=0.5"] if one_pool else []
    if key in ("csv_test", "csv_qg"):
        extra.append("data.options={split_column: split}")
    s = _build(fmt, None if key is None else layouts[key], protocol, *extra)
    v = s.val
    assert v is not None and v.train is None
    train = set(original_train_labels(s).tolist())
    if protocol == "verification":
        val = _classes(v.pairs.images)
        same = v.pairs.images.labels[v.pairs.left] == v.pairs.images.labels[v.pairs.right]
        assert (same == v.pairs.is_same).all() and v.pairs.is_same.any() and (~v.pairs.is_same).any()
        test = set()
    else:
        val = _classes(v.query) | _classes(v.gallery)
        test = _classes(s.query) | _classes(s.gallery)
    assert len(val) >= 2 and len(train) >= 2
    assert not val & train, "validation classes are held out of training"
    assert not val & test, "validation classes are never test classes"
    assert not train & (test - {0}), "zero-shot: train and test share no class (pid 0 = distractors)"
    assert s.train.labels.tolist() == np.unique(s.train.labels, return_inverse=True)[1].tolist(), "relabelled"
    # validation images are training images, evaluated with the evaluation transform
    if v.query is not None:
        assert v.query.transform is s.query.transform if s.query is not None else True
    if protocol == "reid":
        assert v.gallery is not None and v.query.camids is not None
        keys = list(zip(v.query.labels.tolist(), v.query.camids.tolist()))
        assert len(keys) == len(set(keys)), "one query per identity and camera"
        assert len(v.gallery) == len(v.query) + (len(v.gallery) - len(v.query)) and len(v.gallery) >= len(v.query)


def test_same_validation_classes_for_every_run_seed(mini):
    a = _build("image_folder", mini["image_folder"], "retrieval", "seed=0")
    b = _build("image_folder", mini["image_folder"], "retrieval", "seed=7")
    c = _build("image_folder", mini["image_folder"], "retrieval", "data.val_seed=3")
    assert _classes(a.val.query) == _classes(b.val.query)
    assert len(_classes(c.val.query)) == 2


def test_class_split_on_a_two_pool_format():
    """Fashion-MNIST's shape: a training file and a test file with the same classes."""
    rng = np.random.default_rng(0)
    tr_y, te_y = np.repeat(np.arange(10), 6), np.repeat(np.arange(10), 3)
    s = DataSplits(train=ArrayDataset(rng.integers(0, 255, (60, 4, 4), dtype=np.uint8), tr_y),
                   query=ArrayDataset(rng.integers(0, 255, (30, 4, 4), dtype=np.uint8), te_y))
    s = split_classes(s, train_classes=[0, 1, 2, 3, 4])
    assert len(s.train) == 30 and _classes(s.query) == {5, 6, 7, 8, 9} and len(s.query) == 15
    s = carve_validation(s, [3, 4])
    assert _classes(s.val.query) == {3, 4} and len(s.val.query) == 12
    assert s.train_class_ids.tolist() == [0, 1, 2] and s.num_classes == 3


def test_validation_can_score_a_few_images_of_each_class():
    """``data.val_per_class``: a drawn few of each validation class are scored, all leave training."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 7)

    def carve(per_class, seed=0):
        s = DataSplits(train=ArrayDataset(rng.integers(0, 255, (42, 4, 4), dtype=np.uint8), y), query=None)
        return carve_validation(s, [1, 4], seed=seed, per_class=per_class)

    s = carve(3)
    assert np.bincount(s.val.query.labels).tolist() == [0, 3, 0, 0, 3]
    assert s.train_class_ids.tolist() == [0, 2, 3, 5] and len(s.train) == 28  # all 14 left training
    assert carve(3).val.query.indices.tolist() == s.val.query.indices.tolist()  # the same draw
    assert carve(3, seed=1).val.query.indices.tolist() != s.val.query.indices.tolist()
    assert len(carve(None).val.query) == len(carve(10).val.query) == 14


def test_validation_by_name_and_bad_values(mini):
    s = _build("image_folder", mini["image_folder"], "retrieval", "data.train_classes=0.67",
               "data.val_classes=[class_00, class_02]")
    assert _classes(s.val.query) == {0, 2}
    with pytest.raises(ConfigError, match=r"data.val_classes: 'class_05' not among the training classes"):
        _build("image_folder", mini["image_folder"], "retrieval", "data.train_classes=0.67",
               "data.val_classes=[class_00, class_05]")
    with pytest.raises(ConfigError, match=r"data.val_classes: 2 of the 3 training classes would leave 1 to train on \(needs >= 2\)"):
        _build("image_folder", mini["image_folder"], "retrieval", "data.train_classes=0.5", "data.val_classes=0.5")
    with pytest.raises(ConfigError, match=r"data.val_classes.*fraction in \(0, 1\)"):
        load_config(None, ["data.val_classes=1.5"])
    with pytest.raises(ConfigError, match=r"data.test_classes: classes \[2\] are in both"):
        _build("image_folder", mini["image_folder"], "retrieval", "data.train_classes=[0, 1, 2]",
               "data.test_classes=[2, 3]")


def test_verification_pairs_are_balanced_and_in_contiguous_folds():
    labels = np.repeat(np.arange(30), 5)
    left, right, same, fold = verification_pairs(labels, n_folds=10, max_pairs=400, seed=1)
    assert len(left) == 400 and same.sum() == 200
    assert (np.diff(fold) >= 0).all() and set(fold.tolist()) == set(range(10))
    for f in range(10):
        assert same[fold == f].sum() == (~same[fold == f]).sum()
    assert ((labels[left] == labels[right]) == same).all() and (left != right).all()
    again = verification_pairs(labels, n_folds=10, max_pairs=400, seed=1)
    assert all((a == b).all() for a, b in zip((left, right, same, fold), again))
    with pytest.raises(ClassSplitError):
        verification_pairs(np.arange(5))
    # small classes give their share to the large ones; never more pairs than exist
    labels = np.repeat(np.arange(3), [2, 2, 40])
    left, right, same, fold = verification_pairs(labels, max_pairs=200, seed=0)
    assert same.sum() == 100 and len({(a, b) for a, b in zip(left[same], right[same])}) == 100
    assert ((labels[left] == 2) & same).sum() == 98


def test_split_record_tells_test_sets_apart(mini):
    a = describe_splits(_build("image_folder", mini["image_folder"], "retrieval", "data.train_classes=0.67"))
    b = describe_splits(_build("image_folder", mini["image_folder"], "retrieval", "data.train_classes=0.67"))
    c = describe_splits(_build("image_folder", mini["image_folder"], "retrieval", "data.test_classes=[5]"))
    assert a == b and split_differences(a, b) == []
    assert split_differences(a, c) == ["test query: 8 images of 2 classes when trained, 4 images of 1 classes now"]
    assert a["val"]["query"]["classes"] == 2 and a["train"]["classes"] == 2 and a["test"]["query"]["class_ids"] == [4, 5]
    # the same counts, other items: the fingerprint tells them apart
    d = dict(a, test={"query": dict(a["test"]["query"], fingerprint="0" * 16)})
    assert split_differences(a, d) == ["test query: 8 images of 2 classes when trained, 8 images of 2 classes now "
                                       "(the same counts, other items)"]
