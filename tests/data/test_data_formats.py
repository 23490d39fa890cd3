"""Each format loads its generated miniature layout with the protocol's counts and label rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric.data import formats  # noqa: F401  (registers the builders)
from deepmetric.data.base import DataSplits, MetricDataset
from deepmetric.data.protocol import split_classes
from deepmetric.data.transforms import build_transform
from deepmetric.data.formats import DATASETS


def build(name, root, **options) -> DataSplits:
    splits = DATASETS.get(name)(str(root), **options)
    assert isinstance(splits, DataSplits)
    for ds in (splits.train, splits.query, splits.gallery):
        if ds is not None:
            assert isinstance(ds, MetricDataset) and ds.labels.dtype == np.int64
    return splits


def assert_relabelled(ds):
    assert sorted(np.unique(ds.labels).tolist()) == list(range(ds.num_classes))


def test_registered_names():
    for name in ("image_folder", "identity_folder", "csv", "sop", "cub", "cars", "inshop", "lfw",
                 "market1501", "dukemtmc"):
        assert name in DATASETS


def test_image_folder_all_classes_and_transforms(mini):
    s = build("image_folder", mini["image_folder"], train_transform=build_transform("tensor", True),
              test_transform=build_transform("tensor", False, image_size=4))
    assert len(s.train) == len(s.query) == 24 and s.gallery is None and s.num_classes == 6
    assert list(s.class_names.values()) == [f"class_{c:02d}" for c in range(6)]
    x, y, i = s.train[5]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and (y, i) == (1, 5)
    assert s.query[0][0].shape == (3, 4, 4)
    assert s.train.paths[0].endswith("class_00/img_000.jpg")


def test_image_folder_class_split(mini):
    s = split_classes(build("image_folder", mini["image_folder"]), train_classes=["class_00", "class_02", "class_04"])
    assert s.num_classes == 3 and len(s.train) == 12 and len(s.query) == 12
    assert_relabelled(s.train)
    assert sorted(np.unique(s.query.labels).tolist()) == [1, 3, 5]  # folder index kept
    assert [s.class_names[i] for i in s.train_class_ids] == ["class_00", "class_02", "class_04"]
    s = split_classes(build("image_folder", mini["image_folder"]), train_classes=0.5)
    assert [s.class_names[i] for i in s.train_class_ids] == ["class_00", "class_01", "class_02"]
    assert sorted(np.unique(s.query.labels).tolist()) == [3, 4, 5]
    s = split_classes(build("image_folder", mini["image_folder"]), test_classes=["class_05"])
    assert s.num_classes == 5 and np.unique(s.query.labels).tolist() == [5]


def test_identity_folder_is_train_only(mini, tmp_path):
    s = build("identity_folder", mini["image_folder"])
    assert s.query is None and s.pairs is None and len(s.train) == 24 and s.num_classes == 6
    assert_relabelled(s.train)
    from deepmetric.data.synthetic import make_image_folder

    root = make_image_folder(tmp_path / "ids", n_classes=4, per_class=3)
    for f in sorted((root / "class_01").iterdir())[1:]:
        f.unlink()
    s = build("identity_folder", root, min_images=2)
    assert len(s.class_names) - len(s.train_class_ids) == 1 and len(s.train) == 9
    assert [s.class_names[i] for i in s.train_class_ids] == ["class_00", "class_02", "class_03"]
    assert_relabelled(s.train)


def test_csv_without_split_string_labels(mini):
    s = split_classes(build("csv", mini["csv"]), train_classes=0.5)
    assert list(s.class_names.values()) == [f"cls_{c}" for c in "abcdef"]
    assert [s.class_names[i] for i in s.train_class_ids] == ["cls_a", "cls_b", "cls_c"]
    assert len(s.train) == 12 and len(s.query) == 12 and s.gallery is None
    s = split_classes(build("csv", mini["csv"]), test_classes=["cls_f"])
    assert s.num_classes == 5 and np.unique(s.query.labels).tolist() == [5]


def test_csv_split_column_and_camera(mini):
    s = build("csv", mini["csv_test"], split_column="split", camera_column="camera")
    assert len(s.train) == 9 and len(s.query) == 9 and s.gallery is None
    assert_relabelled(s.train)
    assert np.unique(s.query.labels).tolist() == [3, 4, 5]
    assert s.query.camids.tolist() == [0, 1, 2] * 3
    s = build("csv", mini["csv_qg"] / "list.csv", split_column="split")  # root may be the file
    assert (len(s.train), len(s.query), len(s.gallery)) == (9, 3, 6)
    assert np.unique(s.query.labels).tolist() == np.unique(s.gallery.labels).tolist() == [3, 4, 5]


def test_sop_both_list_formats(mini):
    for fmt in ("ebay", "paddleclas", "auto"):
        s = build("sop", mini["sop"], list_format=fmt)
        assert len(s.train) == 12 and len(s.query) == 12 and s.gallery is None
        assert s.train.labels.tolist() == np.repeat(np.arange(4), 3).tolist()  # class_id - 1
        assert s.query.labels.tolist() == np.repeat(np.arange(5, 9), 3).tolist()  # raw class_id
        assert s.train.paths[0].endswith("bicycle_final/111085122871_0.JPG")


def test_sop_accepts_archive_folder(tmp_path):
    from deepmetric.data.synthetic import make_sop

    make_sop(tmp_path / "Stanford_Online_Products", n_classes=4, per_class=2)
    s = build("sop", tmp_path)
    assert s.train.paths[0].startswith(str(tmp_path / "Stanford_Online_Products")) and len(s.train) == 4


def test_cub_and_cars_split_classes_in_half(mini):
    for name in ("cub", "cars"):
        s = build(name, mini[name])
        assert len(s.train) == 9 and len(s.query) == 9 and s.gallery is None
        assert s.train.labels.tolist() == np.repeat(np.arange(3), 3).tolist()
        assert s.query.labels.tolist() == np.repeat([4, 5, 6], 3).tolist()
        assert s.train_class_ids.tolist() == [1, 2, 3]
        assert s.train[0][0].size == (16, 16)
    s = build("cub", mini["cub"], num_train_classes=4)
    assert s.num_classes == 4 and np.unique(s.query.labels).tolist() == [5, 6]
    assert build("cars", mini["cars"]).train.paths[0].endswith("car_ims/000001.jpg")


def test_inshop_query_gallery(mini):
    s = build("inshop", mini["inshop"])
    assert (len(s.train), len(s.query), len(s.gallery)) == (16, 4, 12)
    assert_relabelled(s.train)
    assert s.query.labels.tolist() == [5, 6, 7, 8]
    assert np.unique(s.gallery.labels).tolist() == [5, 6, 7, 8]
    assert s.query[0][0].size == (16, 16)


def test_lfw_pairs(mini):
    s = build("lfw", mini["lfw"], test_transform=build_transform("face", False))
    assert s.train is None and s.query is None
    p = s.pairs
    assert len(p.left) == len(p.right) == len(p.is_same) == 12
    assert p.is_same.tolist() == ([True] * 3 + [False] * 3) * 2
    assert p.fold.tolist() == [0] * 6 + [1] * 6
    assert len(set(p.images.paths)) == len(p.images)  # deduplicated
    lab = p.images.labels
    assert (lab[p.left] == lab[p.right]).tolist() == p.is_same.tolist()
    assert all(p.left[k] != p.right[k] for k in range(12))
    x, _, _ = p.images[int(p.left[0])]
    assert x.shape == (3, 112, 112)
    # the folder holding lfw/ and pairs.txt works too
    assert len(build("lfw", mini["lfw"].parent).pairs.is_same) == 12


@pytest.mark.parametrize("name,key,n_cams", [("market1501", "market", 6), ("dukemtmc", "duke", 8)])
def test_reid_folders(mini, name, key, n_cams):
    s = build(name, mini[key])
    n_ids, per_id = (8, 4) if key == "market" else (6, 3)
    n_train = n_ids // 2
    assert len(s.train) == n_train * per_id and s.num_classes == n_train
    assert_relabelled(s.train)
    assert s.train.camids.min() == 0 and s.train.camids.max() < n_cams
    assert len(s.query) == n_ids - n_train and (s.query.camids == 0).all()
    g = s.gallery
    assert -1 not in g.labels.tolist()  # 2 junk images dropped
    assert (g.labels == 0).sum() == 2  # distractors kept
    assert len(g) == (n_ids - n_train) * per_id + 2
    assert set(s.query.labels.tolist()) == set(range(n_train + 1, n_ids + 1))  # raw pids
    assert set(s.query.labels.tolist()) <= set(g.labels.tolist())
    assert g.camids.min() >= 0 and g.camids.max() <= n_cams - 1
    assert s.train[0][0].size == (8, 16)


def test_reid_accepts_archive_folder(tmp_path):
    from deepmetric.data.synthetic import make_market

    make_market(tmp_path / "Market-1501-v15.09.15", n_ids=4, per_id=2)
    s = DATASETS.get("market1501")(str(tmp_path))
    assert s.train.paths[0].startswith(str(tmp_path / "Market-1501-v15.09.15"))
