from __future__ import annotations

import numpy as np
import pytest

from deepmetric.data import formats  # noqa: F401
from deepmetric.data.base import DataSplits, MetricDataset
from deepmetric.data.check import find_unreadable, format_summary, images_per_class, summarize
from deepmetric.data.protocol import ClassSplitError, split_classes
from deepmetric.data.formats import DATASETS


class Labels(MetricDataset):
    def load(self, i):
        return i


LABELS = np.array([7, 7, 3, 3, 3, 9, 1, 1, 5, 5])


def _one_pool():
    ds = Labels(LABELS, name="toy")
    return DataSplits(train=ds, query=ds.with_transform(None))


@pytest.mark.parametrize("kwargs,train_classes", [
    ({"train_classes": [1, 3]}, [1, 3]),
    ({"test_classes": [9, 5]}, [1, 3, 7]),
    ({"train_classes": [1], "test_classes": [7, 9]}, [1]),
    ({"train_classes": 0.4}, [1, 3]),
    ({"train_classes": 0.01}, [1]),
    ({"train_classes": 0.99}, [1, 3, 5, 7]),
])
def test_class_split_disjoint(kwargs, train_classes):
    s = split_classes(_one_pool(), **kwargs)
    original_train = s.train_class_ids[s.train.labels]
    assert sorted(np.unique(original_train).tolist()) == train_classes
    assert not set(original_train.tolist()) & set(s.query.labels.tolist())
    assert s.train.labels.tolist() == np.unique(original_train, return_inverse=True)[1].tolist()
    if "test_classes" in kwargs and "train_classes" in kwargs:
        assert sorted(set(s.query.labels.tolist())) == sorted(kwargs["test_classes"])
    else:
        assert len(s.train) + len(s.query) == len(LABELS)
    assert s.query[0][1] == s.query.labels[0] and s.query[0][0] == s.query.indices[0]  # views load from the base


def test_class_split_rejects_bad_options():
    for bad in ({"train_classes": 1.0}, {"train_classes": [2]}, {"train_classes": [1, 3], "test_classes": [3]},
                {"test_classes": [1, 3, 5, 7, 9]}, {"train_classes": []}):
        with pytest.raises(ClassSplitError):
            split_classes(_one_pool(), **bad)


def test_images_per_class_buckets():
    labels = np.repeat(np.arange(7), [1, 2, 3, 5, 6, 11, 51])
    assert images_per_class(labels) == {"1": 1, "2": 1, "3-5": 2, "6-10": 1, "11-50": 1, ">50": 1}


def test_summarize_numbers_and_warnings(mini):
    s = DATASETS.get("inshop")(str(mini["inshop"]))
    out = summarize(s)
    assert out["protocol"] == "query/gallery" and out["num_classes"] == 4
    assert out["splits"]["train"] == {"images": 16, "classes": 4, "min_per_class": 4, "median_per_class": 4.0,
                                      "max_per_class": 4, "images_per_class": {"1": 0, "2": 0, "3-5": 4, "6-10": 0,
                                                                               "11-50": 0, ">50": 0}}
    assert out["splits"]["query"]["images_per_class"]["1"] == 4 and out["warnings"] == []
    text = format_summary(out)
    assert "query/gallery" in text and "train" in text and "gallery" in text

    loo = DataSplits(train=None, query=Labels([0, 0, 1, 2, 2, 2]))
    out = summarize(loo)
    assert out["protocol"] == "leave-one-out" and "1 query classes have a single image" in out["warnings"][0]
    qg = DataSplits(train=None, query=Labels([0, 1, 1], camids=[0, 0, 1]), gallery=Labels([0, 0]))
    out = summarize(qg)
    assert "1 query classes (2 queries) have no gallery image" in out["warnings"][0]
    assert out["splits"]["query"]["cameras"] == 2 and "warning:" in format_summary(out)

    lfw = summarize(DATASETS.get("lfw")(str(mini["lfw"])))
    assert lfw["protocol"] == "verification"
    assert lfw["pairs"]["pairs"] == 12 and lfw["pairs"]["same"] == 6 and lfw["pairs"]["folds"] == 2
    assert "12 (6 same, 6 different)" in format_summary(lfw)
    reid = summarize(DATASETS.get("market1501")(str(mini["market"])))
    assert reid["splits"]["gallery"]["cameras"] == 5 and reid["splits"]["train"]["cameras"] == 4


def test_find_unreadable(mini, tmp_path):
    import shutil

    root = shutil.copytree(mini["image_folder"], tmp_path / "f")
    (root / "class_01" / "img_002.jpg").write_bytes(b"junk")
    data = (root / "class_03" / "img_000.jpg").read_bytes()
    (root / "class_03" / "img_000.jpg").write_bytes(data[:40])
    s = DATASETS.get("image_folder")(str(root))
    (root / "class_05" / "img_001.jpg").unlink()
    bad = find_unreadable(s.train, max_workers=2)
    assert [p for p, _ in bad] == [str(root / c) for c in
                                   ("class_01/img_002.jpg", "class_03/img_000.jpg", "class_05/img_001.jpg")]
    assert bad[2][1] == "file not found"
    assert find_unreadable(DATASETS.get("cub")(str(mini["cub"])).query) == []

    class Broken(MetricDataset):
        def load(self, i):
            if i == 1:
                raise RuntimeError("boom")
            return i

    assert find_unreadable(Broken([0, 1, 2], name="b")) == [("b[1]", "RuntimeError: boom")]
