"""Issue 23, items 10-12 on the server: bad settings are one line and exit code 2 before anything loads,
labels an index cannot take and non-finite embeddings are 422 with JSON, never a 500."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deepmetric.cli import main
from deepmetric.inference.index import SearchIndex
from deepmetric.serve import create_app
from serving_helpers import AUTH, KEY, png


def serve_argv(tmp_path, *extra: str):
    # neither file exists: every refusal below comes before the model or the index is loaded
    return ["serve", "--model", str(tmp_path / "missing.onnx"), "--index", str(tmp_path / "missing.index"), *extra]


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_one_line(tmp_path, capsys, port):
    with pytest.raises(SystemExit) as e:
        main(serve_argv(tmp_path, "--port", port))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "port number from 0 to 65535" in err[0], err


@pytest.mark.parametrize("flag,value,words", [
    ("--max-upload-mb", "-1", "--max-upload-mb must be a number above 0"),
    ("--max-upload-mb", "nan", "--max-upload-mb must be a number above 0"),
    ("--max-top-k", "0", "--max-top-k must be an integer of at least 1"),
    ("--save-every", "-1", "--save-every must be an integer of at least 0"),
    ("--workers", "0", "--workers must be an integer of at least 1"),
    ("--queue", "-2", "--queue must be an integer of at least 0"),
    ("--read-timeout", "0", "--read-timeout must be a number above 0"),
    ("--shutdown-timeout", "-5", "--shutdown-timeout must be a number above 0"),
    ("--items-dir", "FILE", "is a file, not a folder"),
])
def test_bad_settings_are_one_line_before_anything_loads(tmp_path, capsys, flag, value, words):
    if value == "FILE":
        value = str(tmp_path / "a_file")
        (tmp_path / "a_file").write_text("not a folder")
    assert main(serve_argv(tmp_path, flag, value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_a_busy_port_is_one_line(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(serve_argv(tmp_path, "--port", str(taken.getsockname()[1]))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen on 127.0.0.1:" in err[0], err


def test_create_app_checks_its_settings_too(predictor_and_index):
    from deepmetric.core.errors import UserError

    with pytest.raises(UserError, match="--max-top-k must be an integer of at least 1, got 0"):
        create_app(*predictor_and_index, max_top_k=0)


@pytest.fixture
def list_file_server(predictor_and_index):
    """A keyed server over an index built from a list file: numeric labels, no class names."""
    predictor, gallery = predictor_and_index
    index = SearchIndex(gallery.dim, gallery.metric, "faiss-flat")
    index.add(gallery.backend.state()["vectors"], gallery.labels, list(gallery.paths))
    with TestClient(create_app(predictor, index, api_key=KEY), raise_server_exceptions=False) as c:
        yield c, index


@pytest.mark.parametrize("label", ["²", "12345678901234567890123", "-3", "zebra", "٣"])
def test_labels_a_list_file_index_cannot_take_are_422(list_file_server, label):
    """Item 12: '²' passed str.isdigit and failed int(); 23 digits overflowed int64: both were a 500."""
    c, index = list_file_server
    r = c.post("/items", files={"file": ("a.png", png(1), "image/png")}, data={"label": label}, headers=AUTH)
    assert r.status_code == 422 and "whole numbers" in r.json()["detail"], r.text
    assert len(index) == 20
    ok = c.post("/items", files={"file": ("a.png", png(1), "image/png")}, data={"label": "7"}, headers=AUTH)
    assert ok.status_code == 201 and ok.json()["items"][0]["label"] == 7


class NaNPredictor:
    """The real predictor, whose embeddings are NaN."""

    def __init__(self, real) -> None:
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def embed_images(self, images):
        return np.full_like(self.real.embed_images(images), np.nan)


def test_non_finite_embeddings_are_refused_with_json(predictor_and_index, tmp_path):
    """Item 10: NaN vectors were accepted; a search with top-k at least the item count then raised
    IndexError (a 500)."""
    predictor, index = predictor_and_index
    path = index.save(tmp_path / "gallery.index")
    app = create_app(NaNPredictor(predictor), path, api_key=KEY)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/items", files={"file": ("a.png", png(2), "image/png")}, headers=AUTH)
        assert r.status_code == 422 and "row 0" in r.json()["detail"] and "NaN" in r.json()["detail"], r.text
        s = c.post("/search?top_k=50", files={"file": ("q.png", png(2), "image/png")}, headers=AUTH)
        assert 400 <= s.status_code < 500 and "NaN" in s.json()["detail"], s.text
    assert len(SearchIndex.load(path)) == 20
