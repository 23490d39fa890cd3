from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepmetric.data.base import DataError
from deepmetric.data.io import ImageListDataset, load_image, read_csv, read_rows, read_table, to_int


def _jpeg(path, size=(8, 8), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=95)
    return path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_image_converts_modes_to_rgb(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    Image.new("L", (5, 4), 128).save(tmp_path / "g.png")
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.save(tmp_path / "p.png", transparency=0)
    Image.new("RGBA", (2, 2), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    for name, size in [("a.jpg", (8, 8)), ("g.png", (5, 4)), ("p.png", (3, 3)), ("rgba.png", (2, 2))]:
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == size
    assert np.asarray(load_image(tmp_path / "g.png"))[0, 0].tolist() == [128, 128, 128]


def test_missing_image_names_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in _one_line(e) and "not found" in str(e.value)


def test_corrupt_image_names_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg at all")
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "bad.jpg")
    assert "bad.jpg" in _one_line(e)


def test_truncated_jpeg_names_file(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert load_image(tmp_path / "full.jpg").size == (64, 64)
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "cut.jpg")
    assert "cut.jpg" in _one_line(e)


def test_directory_and_pixel_limit(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_image(tmp_path)
    _jpeg(tmp_path / "big.jpg", size=(40, 30))
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "big.jpg", max_pixels=1000)
    assert "big.jpg" in _one_line(e) and "1200" in str(e.value)
    assert load_image(tmp_path / "big.jpg", max_pixels=1200).size == (40, 30)


def test_read_table_column_count_error_has_line_number(tmp_path):
    f = tmp_path / "Ebay_train.txt"
    f.write_text("image_id class_id super_class_id path\n1 1 1 a/x.JPG\n\n2 1 a/y.JPG\n")
    cols = ("image_id", "class_id", "super_class_id", "path")
    with pytest.raises(DataError) as e:
        read_table(f, cols, header_if=lambda r: r[0] == "image_id")
    assert _one_line(e).endswith(
        "Ebay_train.txt line 4: expected 4 columns 'image_id class_id super_class_id path', got 3"
    )
    f.write_text("image_id class_id super_class_id path\n1 1 1 a/x y.JPG\n")
    rows = read_table(f, cols, header_if=lambda r: r[0] == "image_id", last_column_may_contain_sep=True)
    assert rows[0].line == 2 and rows[0].fields[3] == "a/x y.JPG"


def test_read_helpers_errors(tmp_path):
    with pytest.raises(DataError, match="missing.txt: list file not found"):
        read_rows(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not a UTF-8"):
        read_rows(tmp_path / "bin.txt")
    with pytest.raises(DataError, match="x.txt line 3: column 'class_id' should be an integer, got 'abc'"):
        to_int("abc", "x.txt", 3, "class_id")
    (tmp_path / "l.csv").write_text("path,label\na.jpg,1\nb.jpg\n")
    with pytest.raises(DataError, match="l.csv line 3: expected 2 cells"):
        read_csv(tmp_path / "l.csv", ["path", "label"])
    with pytest.raises(DataError, match="no column 'split'"):
        read_csv(tmp_path / "l.csv", ["path", "split"])


def test_image_list_dataset_resolves_paths_and_loads_lazily(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    ds = ImageListDataset(["a.jpg", "gone.jpg"], [3, 4], camids=[0, 1], root=tmp_path, transform=np.asarray)
    assert ds.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")]
    assert ds.labels.dtype == np.int64 and ds.camids.tolist() == [0, 1]
    x, y, i = ds[0]
    assert x.shape == (8, 8, 3) and (y, i) == (3, 0)
    with pytest.raises(DataError, match="gone.jpg"):
        ds[1]


def test_symlinked_class_folders_are_followed_and_loops_are_not(tmp_path):
    """A data set assembled by linking folders from several places: the linked classes count, a link
    back up the tree is not walked twice, and embed's input listing sees the same images."""
    from deepmetric.data.io import find_images
    from deepmetric.data.synthetic import make_image_folder
    from deepmetric.inference.predictor import list_inputs

    elsewhere = make_image_folder(tmp_path / "elsewhere", n_classes=3, per_class=2, size=8)
    root = tmp_path / "assembled"
    root.mkdir()
    for name in sorted(p.name for p in elsewhere.iterdir() if p.is_dir()):
        (root / f"linked_{name}").symlink_to(elsewhere / name, target_is_directory=True)
    own = root / "own"
    own.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(own / "x.png")
    (own / "loop").symlink_to(root, target_is_directory=True)  # a loop through the whole tree
    names, paths, labels = find_images(str(root))
    assert names == sorted(["linked_" + p.name for p in elsewhere.iterdir() if p.is_dir()] + ["own"])
    per_class = np.bincount(labels, minlength=len(names))
    assert per_class.tolist() == [2, 2, 2, 1]  # the loop leads to folders already walked
    assert len(paths) == len(set(paths))
    inputs = list_inputs(root)
    assert len(inputs.paths) == len(paths) and inputs.class_names == names
