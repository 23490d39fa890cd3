"""``deepmetric serve --index milvus://gallery.db``: POST /items and DELETE /items/{id} go to the Milvus
collection (no change log of the server's own), and a restarted server finds what it was told."""
from __future__ import annotations

import argparse

import pytest

from fastapi.testclient import TestClient

from tests.conftest import require_module

require_module("pymilvus", "the milvus extra")
require_module("milvus_lite", "the milvus extra")

from deepmetric.inference.milvus_backend import MilvusIndex  # noqa: E402
from deepmetric.inference.predictor import list_inputs  # noqa: E402
from deepmetric.serve.cli import build_app, register  # noqa: E402
from serving_helpers import AUTH, KEY, png  # noqa: E402


@pytest.fixture
def milvus_gallery(predictor_and_index, checkpoint_dir, image_folder, tmp_path):
    """The tiny gallery (20 images) in a Milvus Lite file, and the parsed ``deepmetric serve`` arguments."""
    predictor = predictor_and_index[0]
    inputs = list_inputs(image_folder)
    es = predictor.embed_list(inputs.paths, inputs.labels, progress=False)
    db = tmp_path / "gallery.db"
    MilvusIndex.build(es, str(db), class_names=inputs.class_names, source={"model": predictor.fingerprint}).close()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", "--model", str(checkpoint_dir), "--index", f"milvus://{db}",
                              "--allowed-hosts", "*"]), db


def test_items_go_to_the_collection_and_survive_a_restart(milvus_gallery, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPMETRIC_API_KEY", KEY)
    args, db = milvus_gallery
    a, b = png(11), png(12)
    with TestClient(build_app(args), raise_server_exceptions=False) as c:
        health = c.get("/health", headers=AUTH).json()["index"]
        assert (health["backend"], health["count"]) == ("milvus", 20)
        r = c.post("/items", files=[("file", ("a.png", a, "image/png")), ("file", ("b.png", b, "image/png"))],
                   data={"label": ["zebra", "class_01"]}, headers=AUTH)
        assert r.status_code == 201, r.text
        added = r.json()["items"]
        assert r.json()["count"] == 22 and [i["label_name"] for i in added] == ["zebra", "class_01"]
        gallery = c.app.state.items
        assert gallery.log is None and gallery.owner is None, "Milvus keeps the changes: no log or lock of ours"
        hit = c.post("/search?top_k=1", files={"file": ("q.png", a, "image/png")}, headers=AUTH).json()["hits"][0]
        assert (hit["id"], hit["label_name"]) == (added[0]["id"], "zebra")
        assert c.get(hit["image_url"], headers=AUTH).content == a
        gone = added[1]["id"]
        assert c.delete(f"/items/{gone}", headers=AUTH).json() == {"removed": [gone], "count": 21}
        assert c.delete(f"/items/{gone}", headers=AUTH).status_code == 404
    assert not list(tmp_path.rglob("*.wal")) and (tmp_path / "gallery.db.items").is_dir()

    with TestClient(build_app(args), raise_server_exceptions=False) as c:  # the restart
        assert c.get("/health", headers=AUTH).json()["index"]["count"] == 21
        hit = c.post("/search?top_k=1", files={"file": ("q.png", a, "image/png")}, headers=AUTH).json()["hits"][0]
        assert (hit["id"], hit["label_name"]) == (added[0]["id"], "zebra")
        hits = c.post("/search?top_k=21", files={"file": ("q.png", b, "image/png")}, headers=AUTH).json()["hits"]
        assert gone not in [h["id"] for h in hits]
        assert c.delete(f"/items/{gone}", headers=AUTH).status_code == 404, "ids are never reused"
        r = c.post("/items", files={"file": ("c.png", png(13), "image/png")}, data={"label": "zebra"}, headers=AUTH)
        new = r.json()["items"][0]
        assert new["id"] > gone and new["label"] == added[0]["label"], "a class keeps its label across restarts"

        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(str(db))  # Milvus goes away under the server
        r = c.post("/search", files={"file": ("q.png", a, "image/png")}, headers=AUTH)
        assert r.status_code == 503 and "not reachable" in r.json()["detail"]
        r = c.post("/items", files={"file": ("d.png", png(14), "image/png")}, headers=AUTH)
        assert r.status_code == 503
        assert len([p for p in (tmp_path / "gallery.db.items").rglob("*.png")]) == 2, "the failed add kept no image"
