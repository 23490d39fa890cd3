"""Broken layouts give one-line DataErrors naming the path (and line) and what was expected."""
from __future__ import annotations

import os
import shutil

import pytest

from deepmetric.data import formats  # noqa: F401
from deepmetric.data import synthetic
from deepmetric.data.base import DataError
from deepmetric.data.protocol import ClassSplitError, split_classes
from deepmetric.data.formats import DATASETS

ALL = ["image_folder", "identity_folder", "csv", "sop", "cub", "cars", "inshop", "lfw", "market1501", "dukemtmc"]


def error(name, root, **options) -> str:
    with pytest.raises(DataError) as e:
        splits = DATASETS.get(name)(None if root is None else str(root), **options)
        for ds in (splits.train, splits.query, splits.gallery):  # a lazily detected problem
            if ds is not None:
                for i in range(len(ds)):
                    ds[i]
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("name", ALL)
def test_missing_root_and_no_root(name, tmp_path):
    msg = error(name, tmp_path / "does_not_exist")
    assert str(tmp_path / "does_not_exist") in msg and "not found" in msg and "expected" in msg
    assert "no data root given" in error(name, None)


@pytest.mark.parametrize("name,needs", [
    ("sop", "missing Ebay_train.txt"), ("cub", "missing images.txt"), ("cars", "missing cars_annos.mat"),
    ("inshop", "missing list_eval_partition.txt"), ("lfw", "missing pairs.txt"),
    ("market1501", "missing bounding_box_train/"), ("dukemtmc", "missing bounding_box_train/"),
    ("csv", "missing list.csv"),
])
def test_wrong_folder(name, needs, mini):
    """An image folder handed to a list-based format names the file it lacks."""
    msg = error(name, mini["image_folder"])
    assert needs in msg and str(mini["image_folder"]) in msg


def test_sop_wrong_folder_message(tmp_path):
    msg = error("sop", tmp_path)
    assert msg.startswith(f"SOP root {tmp_path}: missing Ebay_train.txt (expected the Stanford_Online_Products")
    msg = error("sop", tmp_path, list_format="paddleclas")
    assert "missing train_list.txt" in msg


def test_unknown_option_is_a_type_error(mini):
    with pytest.raises(TypeError):
        DATASETS.get("sop")(str(mini["sop"]), colour="red")


def test_image_folder_empty_class_and_loose_images(tmp_path):
    root = synthetic.make_image_folder(tmp_path / "f", n_classes=2, per_class=2)
    (root / "class_02").mkdir()
    msg = error("image_folder", root)
    assert str(root / "class_02") in msg and "no images" in msg
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(root / "class_00" / "img_000.jpg", loose / "x.jpg")
    msg = error("image_folder", loose)
    assert "no class subfolders" in msg and "1 images directly" in msg
    (root / "class_02").rmdir()
    with pytest.raises(ClassSplitError, match="train_classes: 'nope' not in the data .*class names such as 'class_00'"):
        split_classes(DATASETS.get("image_folder")(str(root)), train_classes=["class_00", "nope"])


def _copy(mini, key, tmp_path):
    return shutil.copytree(mini[key], tmp_path / key)


def test_sop_malformed_list_names_file_and_line(mini, tmp_path):
    root = _copy(mini, "sop", tmp_path)
    lines = (root / "Ebay_train.txt").read_text().splitlines()
    lines[3] = "4 2 1"
    (root / "Ebay_train.txt").write_text("\n".join(lines) + "\n")
    msg = error("sop", root)
    assert msg == (f"{root / 'Ebay_train.txt'} line 4: expected 4 columns "
                   "'image_id class_id super_class_id path', got 3")
    lines[3] = "4 two 1 a.JPG"
    (root / "Ebay_train.txt").write_text("\n".join(lines) + "\n")
    assert "line 4: column 'class_id' should be an integer, got 'two'" in error("sop", root)
    (root / "test_list.txt").write_text("a.JPG 1\n")
    assert "test_list.txt line 1: expected 3 columns 'path label unique_id', got 2" in error(
        "sop", root, list_format="paddleclas")


def test_sop_missing_image_named_on_load(mini, tmp_path):
    root = _copy(mini, "sop", tmp_path)
    victim = root / "bicycle_final" / "111085122871_1.JPG"
    os.remove(victim)
    msg = error("sop", root)
    assert str(victim) in msg and "not found" in msg


def test_corrupt_jpeg_in_dataset_named(mini, tmp_path):
    root = _copy(mini, "cub", tmp_path)
    victim = next((root / "images").rglob("*.jpg"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    assert str(victim) in error("cub", root)


def test_cub_image_without_class(mini, tmp_path):
    root = _copy(mini, "cub", tmp_path)
    (root / "image_class_labels.txt").write_text("1 1\n")
    assert "images.txt line 2: image id 2 has no class" in error("cub", root)


def test_cars_bad_mat(mini, tmp_path):
    root = _copy(mini, "cars", tmp_path)
    (root / "cars_annos.mat").write_bytes(b"garbage")
    assert "cars_annos.mat: not a readable MATLAB file" in error("cars", root)
    import scipy.io
    import numpy as np

    scipy.io.savemat(root / "cars_annos.mat", {"something": np.zeros(3)})
    assert "expected a struct array 'annotations'" in error("cars", root)


def test_inshop_malformed(mini, tmp_path):
    root = _copy(mini, "inshop", tmp_path)
    f = root / "Eval" / "list_eval_partition.txt"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:-1]) + "\n")
    assert "line 1 announces 32 images but 31 rows follow" in error("inshop", root)
    lines[5] = lines[5].replace("train", "val")
    f.write_text("\n".join(lines) + "\n")
    assert f"{f} line 6: evaluation_status must be train, query or gallery, got 'val'" in error("inshop", root)


def test_lfw_malformed_pairs_and_missing_image(mini, tmp_path):
    base = shutil.copytree(mini["lfw"].parent, tmp_path / "lfwset")
    pairs = base / "pairs.txt"
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines[:-1]) + "\n")
    assert "announces 12 pairs (2 sets x 3 matched + 3 mismatched) but 11 lines follow" in error("lfw", base / "lfw")
    bad = list(lines)
    bad[2] = "Person_A00\t1\tPerson_B01\t2"  # a mismatched line where a matched one belongs
    pairs.write_text("\n".join(bad) + "\n")
    assert f"{pairs} line 3: expected a matched pair 'name i j' (set 1), got 4 fields" in error("lfw", base / "lfw")
    pairs.write_text("\n".join(lines) + "\n")
    name, i = lines[1].split("\t")[:2]
    victim = os.path.join(name, f"{name}_{int(i):04d}.jpg")
    os.remove(base / "lfw" / victim)
    msg = error("lfw", base / "lfw")
    assert f"missing image {victim}" in msg and "pairs.txt line" in msg


def test_reid_bad_filename(mini, tmp_path):
    root = _copy(mini, "market", tmp_path)
    shutil.copy(next((root / "query").iterdir()), root / "query" / "holiday.jpg")
    msg = error("market1501", root)
    assert str(root / "query" / "holiday.jpg") in msg and "<pid>_c<camera>" in msg


def test_csv_bad_split_value(mini, tmp_path):
    root = _copy(mini, "csv_test", tmp_path)
    f = root / "list.csv"
    lines = f.read_text().splitlines()
    lines[2] = lines[2].replace(",train,", ",validation,")
    f.write_text("\n".join(lines) + "\n")
    assert "list.csv line 3: column 'split' must be one of train, query, gallery, test" in error(
        "csv", root, split_column="split")
    assert "header has no column 'group'" in error("csv", root, split_column="group")
