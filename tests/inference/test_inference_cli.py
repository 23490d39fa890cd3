"""The commands end to end through ``deepmetric.cli.main``: embed -> index build -> search, export,
and bad input as one line with exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deepmetric.cli import main


def test_embed_index_search(checkpoint_dir, image_folder, tmp_path, capsys):
    feats, index = tmp_path / "features.npz", tmp_path / "gallery.index"
    assert main(["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder),
                 "--output", str(feats), "--chunk-size", "8", "--no-progress"]) == 0
    assert "20 x 16 float32 embeddings (20 labelled, 4 classes)" in capsys.readouterr().out
    assert main(["index", "build", "--embeddings", str(feats), "--output", str(index),
                 "--backend", "faiss-hnsw", "--param", "ef_search=32"]) == 0
    assert "faiss-hnsw cosine index of 20 vectors" in capsys.readouterr().out
    query = sorted(image_folder.glob("class_02/*.jpg"))[0]
    assert main(["search", "--index", str(index), "--checkpoint", str(checkpoint_dir), "--query", str(query),
                 "--top-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    hits = result[0]["hits"]
    assert len(hits) == 3 and hits[0]["path"] == str(query) and hits[0]["label_name"] == "class_02"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert main(["search", "--index", str(index), "--checkpoint", str(checkpoint_dir), "--query", str(query)]) == 0
    out = capsys.readouterr().out
    assert "similarity" in out and "class_02" in out
    assert main(["index", "info", str(index)]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["ef_search"] == 32


def test_centroid_index_from_cli(checkpoint_dir, image_folder, tmp_path, capsys):
    feats, index = tmp_path / "f.npz", tmp_path / "c.index"
    main(["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder), "--output", str(feats),
          "--dtype", "float16", "--no-progress"])
    assert main(["index", "build", "--embeddings", str(feats), "--output", str(index), "--centroids"]) == 0
    assert "4 centroids of 20 vectors" in capsys.readouterr().out


def test_export_prints_parity(checkpoint_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(checkpoint_dir), "--format", "onnx", "--output",
                 str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and "N x 3 x 32x32" in out
    assert main(["export", "--checkpoint", str(checkpoint_dir), "--format", "onnx", "--output",
                 str(tmp_path / "bad.onnx"), "--atol", "-1"]) == 2
    assert "differs from PyTorch" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint_dir), "--format", "torchscript", "--output",
                 str(tmp_path / "m.pt")]) == 0


@pytest.mark.parametrize("case", ["foreign_index", "missing_query", "missing_checkpoint", "npz_as_index",
                                  "bad_param", "dim_mismatch"])
def test_bad_input_is_one_line_and_exit_2(checkpoint_dir, image_folder, tmp_path, capsys, case):
    from deepmetric.inference.index import SearchIndex

    query = str(sorted(image_folder.rglob("*.jpg"))[0])
    foreign = tmp_path / "foreign.index"
    foreign.write_bytes(b"hello world, not an index")
    wrong_dim = SearchIndex(8)
    wrong_dim.add(np.eye(8, dtype=np.float32))
    wrong_dim.save(tmp_path / "dim8.index")
    right_dim = SearchIndex(16)
    right_dim.add(np.ones((1, 16), np.float32))
    right_dim.save(tmp_path / "dim16.index")
    np.savez(tmp_path / "f.npz", vectors=np.zeros((2, 16)))
    ck = str(checkpoint_dir)
    argv = {
        "foreign_index": ["search", "--index", str(foreign), "--checkpoint", ck, "--query", query],
        "missing_query": ["search", "--index", str(tmp_path / "dim16.index"), "--checkpoint", ck, "--query", "nope.jpg"],
        "missing_checkpoint": ["embed", "--checkpoint", str(tmp_path / "nockpt"), "--input", str(image_folder),
                               "--output", str(tmp_path / "o.npz")],
        "npz_as_index": ["search", "--index", str(tmp_path / "f.npz"), "--checkpoint", ck, "--query", query],
        "bad_param": ["index", "build", "--embeddings", str(tmp_path / "f.npz"), "--output", str(tmp_path / "x"),
                      "--param", "nprobe"],
        "dim_mismatch": ["search", "--index", str(tmp_path / "dim8.index"), "--checkpoint", ck, "--query", query],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepmetric: error: ") and "\n" not in err
    expect = {"foreign_index": "foreign.index: not a deepmetric index", "missing_query": "nope.jpg",
              "missing_checkpoint": "nockpt", "npz_as_index": "f.npz: not a deepmetric index",
              "bad_param": "expected KEY=VALUE", "dim_mismatch": "8-d vectors"}[case]
    assert expect in err


def test_embed_with_worker_processes_gives_the_same_vectors(checkpoint_dir, image_folder, tmp_path, capsys):
    from deepmetric.inference.predictor import load_embeddings

    runs = {}
    for workers in ("auto", "2"):  # auto on a CPU: decode in this process
        out = tmp_path / f"w{workers}.npz"
        assert main(["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder),
                     "--output", str(out), "--workers", workers, "--no-progress"]) == 0
        runs[workers] = load_embeddings(out).embeddings
    np.testing.assert_array_equal(runs["auto"].vectors.numpy(), runs["2"].vectors.numpy())
    assert list(runs["auto"].paths) == list(runs["2"].paths)
    with pytest.raises(SystemExit):
        main(["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder),
              "--output", str(tmp_path / "x.npz"), "--workers", "-1"])
    assert "expected a number of processes >= 0 or 'auto'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["embed_under_a_file", "build_under_a_file", "build_read_only", "build_disk_full"])
def test_an_output_that_cannot_be_written_is_one_line(checkpoint_dir, image_folder, tmp_path, capsys, monkeypatch,
                                                      case):
    """Issue 23, item 11: `embed --output F/x.npz` and `index build --output F/x.index` (F a file), and a
    build onto a read-only folder, were tracebacks. (The tests run as root, where permissions do not
    refuse: the read-only folder and the full disk are simulated.)"""
    import errno

    from deepmetric.core import files
    from deepmetric.inference import index_file

    (tmp_path / "F").write_text("a file, not a folder")
    np.savez(tmp_path / "f.npz", vectors=np.eye(2, 16, dtype=np.float32), labels=np.array([0, 1]),
             paths=np.array(["/x/a.jpg", "/x/b.jpg"]), class_names=np.array(["a", "b"]), meta=np.array("{}"))
    build = ["index", "build", "--embeddings", str(tmp_path / "f.npz"), "--output"]
    if case == "build_read_only":
        monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    if case == "build_disk_full":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".x.index.1a2b3c4d.tmp"))
        monkeypatch.setattr(index_file, "atomic_write", full)
    argv, expect = {
        "embed_under_a_file": (["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder),
                                "--output", str(tmp_path / "F" / "x.npz")], "is a file, not a folder"),
        "build_under_a_file": (build + [str(tmp_path / "F" / "sub" / "x.index")], "is a file, not a folder"),
        "build_read_only": (build + [str(tmp_path / "x.index")], "permission denied"),
        "build_disk_full": (build + [str(tmp_path / "x.index")], "No space left on device"),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepmetric: error: --output ") and "\n" not in err and expect in err, err


def test_embed_logs_progress_lines_off_a_terminal(checkpoint_dir, image_folder, tmp_path, caplog, monkeypatch):
    """Off a terminal (here: pytest's captured stderr) embed logs lines, not a tqdm bar; a resumed run
    counts from where it starts."""
    import logging

    from deepmetric.inference import cli as inference_cli

    monkeypatch.setattr(inference_cli, "PROGRESS_EVERY_S", 0.0)
    out = tmp_path / "f.npz"
    with caplog.at_level(logging.INFO, logger="deepmetric"):
        assert main(["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder), "--output",
                     str(out), "--chunk-size", "8", "--batch-size", "4"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embed: ")]
    assert lines[0].startswith("embed: 4/20 images") and lines[-1].startswith("embed: 20/20 images"), lines
    assert all("img/s  ETA " in line for line in lines), lines
