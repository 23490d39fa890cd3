"""``deepmetric index add`` and ``index remove`` through ``deepmetric.cli.main``: what they print, the
index they leave, and bad input as one line with exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deepmetric.cli import main
from deepmetric.inference.index import SearchIndex

D = 8


def features(path, vectors, labels, names, model="model-a"):
    """A features.npz as 'deepmetric embed' writes it (vectors, labels, paths, class names, meta)."""
    paths = [f"/photos/{names[lab]}/{path.stem}-{i}.jpg" for i, lab in enumerate(labels)]
    np.savez(path, vectors=np.asarray(vectors, np.float32), labels=np.asarray(labels, np.int64),
             paths=np.array(paths), class_names=np.array(names), meta=np.array(json.dumps({"model": model})))
    return path, paths


@pytest.fixture()
def gallery(tmp_path, capsys):
    rng = np.random.default_rng(3)
    f, paths = features(tmp_path / "day1.npz", rng.standard_normal((12, D)), [0, 1, 2] * 4, ["mug", "kettle", "cup"])
    index = tmp_path / "gallery.index"
    assert main(["index", "build", "--embeddings", str(f), "--output", str(index), "--backend", "faiss-hnsw"]) == 0
    capsys.readouterr()
    return index, paths


def test_add_then_remove(gallery, tmp_path, capsys):
    index, paths = gallery
    new = np.eye(D, dtype=np.float32)[:3] * 5
    f, new_paths = features(tmp_path / "day2.npz", new, [0, 1, 1], ["cup", "teapot"])  # its own numbering
    assert main(["index", "add", "--index", str(index), "--embeddings", str(f)]) == 0
    assert capsys.readouterr().out.strip() == f"added 3 items to {index} (ids 12..14); now 15 items"
    loaded = SearchIndex.load(index)
    assert loaded.class_names == ["mug", "kettle", "cup", "teapot"]
    hit = loaded.search(new[1], k=1)[0][0]
    assert (hit.id, hit.path, hit.label_name) == (13, new_paths[1], "teapot")

    assert main(["index", "remove", "--index", str(index), "--ids", "3", "7", "--paths", paths[0]]) == 0
    assert capsys.readouterr().out.strip() == f"removed 3 items from {index} (ids 0, 3, 7); now 12 items"
    assert main(["index", "remove", "--index", str(index), "--labels", "teapot"]) == 0
    assert capsys.readouterr().out.strip() == f"removed 2 items from {index} (ids 13..14); now 10 items"
    loaded = SearchIndex.load(index)
    assert loaded.ids.tolist() == [1, 2, 4, 5, 6, 8, 9, 10, 11, 12] and loaded.next_id == 15
    assert main(["index", "info", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 10 and info["next_id"] == 15


def test_centroid_index_add_reports_updated_and_new(tmp_path, capsys):
    rng = np.random.default_rng(4)
    f, _ = features(tmp_path / "a.npz", rng.standard_normal((6, D)), [0, 1, 0, 1, 0, 1], ["mug", "kettle"])
    index = tmp_path / "c.index"
    assert main(["index", "build", "--embeddings", str(f), "--output", str(index), "--centroids"]) == 0
    f2, _ = features(tmp_path / "b.npz", rng.standard_normal((3, D)), [0, 1, 1], ["kettle", "teapot"])
    capsys.readouterr()
    assert main(["index", "add", "--index", str(index), "--embeddings", str(f2)]) == 0
    assert capsys.readouterr().out.strip() == \
        f"added 3 vectors to {index}: 1 centroids updated, 1 new (ids 2..3); now 3 centroids"
    loaded = SearchIndex.load(index)
    assert sorted(zip(loaded.labels.tolist(), loaded.counts.tolist())) == [(0, 3), (1, 4), (2, 2)]


@pytest.mark.parametrize("case", ["unknown_id", "unknown_path", "unknown_label", "nothing_named", "remove_all",
                                  "wrong_dim", "other_model", "missing_index", "foreign_index"])
def test_bad_input_is_one_line_and_exit_2(gallery, tmp_path, capsys, case):
    index, paths = gallery
    before = index.read_bytes()
    wrong_dim, _ = features(tmp_path / "w.npz", np.ones((2, D + 1)), [0, 0], ["mug"])
    other, _ = features(tmp_path / "o.npz", np.ones((2, D)), [0, 0], ["mug"], model="model-b")
    (tmp_path / "foreign.index").write_bytes(b"GIF89a not an index at all")
    remove = ["index", "remove", "--index", str(index)]
    argv, expect = {
        "unknown_id": (remove + ["--ids", "3", "99"], "no item with id 99"),
        "unknown_path": (remove + ["--paths", "/photos/none.jpg"], "no item with path /photos/none.jpg"),
        "unknown_label": (remove + ["--labels", "teapot"], "no item has label teapot"),
        "nothing_named": (remove, "name the items to remove by ids, paths or labels"),
        "remove_all": (remove + ["--labels", "mug", "kettle", "cup"], "would remove all 12 items"),
        "wrong_dim": (["index", "add", "--index", str(index), "--embeddings", str(wrong_dim)], "expected shape (N, 8)"),
        "other_model": (["index", "add", "--index", str(index), "--embeddings", str(other)], "--allow-other-model"),
        "missing_index": (["index", "add", "--index", str(tmp_path / "nope.index"), "--embeddings", str(other)],
                          "index file not found"),
        "foreign_index": (["index", "remove", "--index", str(tmp_path / "foreign.index"), "--ids", "1"],
                          "foreign.index: not a deepmetric index"),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepmetric: error: ") and "\n" not in err and expect in err, err
    assert index.read_bytes() == before  # a refused change leaves the file as it was


def test_other_model_allowed_when_asked(gallery, tmp_path, capsys):
    index, _ = gallery
    other, _ = features(tmp_path / "o.npz", np.ones((2, D)), [0, 0], ["mug"], model="model-b")
    assert main(["index", "add", "--index", str(index), "--embeddings", str(other), "--allow-other-model"]) == 0
    assert "now 14 items" in capsys.readouterr().out


def test_build_accepts_the_old_metric_name(tmp_path, capsys):
    f, _ = features(tmp_path / "a.npz", np.eye(D)[:4], [0, 1, 0, 1], ["mug", "kettle"])
    assert main(["index", "build", "--embeddings", str(f), "--output", str(tmp_path / "g.index"), "--metric", "l2"]) == 0
    assert "exact squared_euclidean index of 4 vectors" in capsys.readouterr().out
    assert SearchIndex.load(tmp_path / "g.index").metric == "squared_euclidean"


def test_non_finite_vectors_are_one_line_naming_the_row(gallery, tmp_path, capsys):
    """Issue 23, item 10: NaN vectors were accepted by build and add, and a search with top-k of at least
    the item count then raised IndexError."""
    index, _ = gallery
    vectors = np.ones((3, D))
    vectors[2, 5] = np.nan
    f, paths = features(tmp_path / "nan.npz", vectors, [0, 1, 0], ["mug", "kettle"])
    before = index.read_bytes()
    for argv in (["index", "build", "--embeddings", str(f), "--output", str(tmp_path / "nan.index")],
                 ["index", "add", "--index", str(index), "--embeddings", str(f)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"row 2 ({paths[2]}) holds NaN or infinite values" in err, err
    assert index.read_bytes() == before and not (tmp_path / "nan.index").exists()


@pytest.mark.parametrize("params", [["nlist=100000"], ["nlist=4", "nbits=8"]])
def test_more_clusters_than_vectors_is_one_line(tmp_path, capsys, params):
    """Issue 23, item 11: --param nlist=100000 on a few vectors was a FAISS traceback."""
    f, _ = features(tmp_path / "a.npz", np.random.default_rng(0).standard_normal((40, D)), [0] * 40, ["mug"])
    backend = "faiss-ivf" if len(params) == 1 else "faiss-ivfpq"
    argv = ["index", "build", "--embeddings", str(f), "--output", str(tmp_path / "g.index"), "--backend", backend]
    assert main(argv + [a for p in params for a in ("--param", p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "at least" in err and "there are 40" in err, err
