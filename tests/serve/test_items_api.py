"""Changing the live index over HTTP: POST /items and DELETE /items/{id} need the API key (403 on a
read-only server, 401 without or with a wrong key), added items are found by /search and served by
/images, removed ones are gone, the index file is saved, and the upload limits hold."""
from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from deepmetric.core.errors import UserError
from deepmetric.inference.index import SearchIndex
from deepmetric.serve import create_app
from serving_helpers import AUTH, KEY, png


@pytest.fixture
def fresh_index(predictor_and_index, tmp_path):
    """A copy of the session's gallery index (20 images, ids 0..19) in ``tmp_path``, to change."""
    path = predictor_and_index[1].save(tmp_path / "gallery.index")
    return SearchIndex.load(path), path


@pytest.fixture
def keyed(predictor_and_index, fresh_index, tmp_path):
    index, path = fresh_index
    app = create_app(predictor_and_index[0], index, api_key=KEY, items_dir=tmp_path / "items", index_path=path,
                     max_upload_mb=0.5)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, index, path, tmp_path / "items"


def test_a_server_without_key_is_read_only(predictor_and_index, fresh_index, image_folder):
    index, _ = fresh_index
    with TestClient(create_app(predictor_and_index[0], index), raise_server_exceptions=False) as c:
        r = c.post("/items", files={"file": ("a.png", png(0), "image/png")}, headers=AUTH)
        assert r.status_code == 403 and "read-only" in r.json()["detail"]
        assert c.delete("/items/0", headers=AUTH).status_code == 403
        query = sorted(image_folder.glob("class_01/*.jpg"))[0].read_bytes()
        assert c.post("/search", files={"file": ("q.jpg", query, "image/jpeg")}).status_code == 200
        assert "/items" not in c.get("/openapi.json").json()["paths"]
    assert len(index) == 20


def test_a_missing_or_wrong_key_is_refused(keyed):
    c, index, _, _ = keyed
    files = {"file": ("a.png", png(0), "image/png")}
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}):
        r = c.post("/items", files=files, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["detail"], headers
        assert c.delete("/items/3", headers=headers).status_code == 401
    assert len(index) == 20
    assert c.post("/items", files=files, headers={"Authorization": f"Bearer {KEY}"}).status_code == 201
    paths = c.get("/openapi.json", headers=AUTH).json()["paths"]
    assert {"401", "403", "413", "503"} <= set(paths["/items"]["post"]["responses"])


def test_added_items_are_found_served_and_saved(keyed):
    c, index, path, items_dir = keyed
    a, b = png(1), png(2)
    r = c.post("/items", files=[("file", ("new one.png", a, "image/png")), ("file", ("b.png", b, "image/png"))],
               data={"label": ["zebra", "class_01"]}, headers=AUTH)
    assert r.status_code == 201, r.text
    body = r.json()
    assert [i["id"] for i in body["items"]] == [20, 21] and body["count"] == 22
    assert [i["label_name"] for i in body["items"]] == ["zebra", "class_01"]
    assert body["items"][1]["label"] == index.class_names.index("class_01"), "an existing class keeps its label"
    assert body["items"][0]["name"] == "new_one.png"
    hit = c.post("/search?top_k=1", files={"file": ("q.png", a, "image/png")}, headers=AUTH).json()["hits"][0]
    assert (hit["id"], hit["label_name"], hit["image_url"]) == (20, "zebra", "/images/20")
    image = c.get("/images/20", headers=AUTH)
    assert image.status_code == 200 and image.content == a
    saved = SearchIndex.load(path)
    assert len(saved) == 22 and saved.class_names[-1] == "zebra"
    assert saved.path_of(21).startswith(str(items_dir))


def test_removed_items_are_gone(keyed):
    c, index, path, items_dir = keyed
    a = png(3)
    new_id = c.post("/items", files={"file": ("x.png", a, "image/png")}, headers=AUTH).json()["items"][0]["id"]
    stored = index.path_of(new_id)
    r = c.delete(f"/items/{new_id}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"removed": [new_id], "count": 20}
    hits = c.post("/search?top_k=20", files={"file": ("q.png", a, "image/png")}, headers=AUTH).json()["hits"]
    assert new_id not in [h["id"] for h in hits]
    assert c.get(f"/images/{new_id}", headers=AUTH).status_code == 404
    assert not (items_dir / stored).exists() and len(SearchIndex.load(path)) == 20
    assert c.delete(f"/items/{new_id}", headers=AUTH).status_code == 404, "ids are never reused"
    assert c.delete(f"/items/{2 ** 70}", headers=AUTH).status_code == 404
    assert c.delete("/items/0", headers=AUTH).status_code == 200, "a gallery item can go too"


def test_uploads_keep_the_search_limits(keyed, bomb_png):
    c, index, _, _ = keyed
    assert c.post("/items", files={"file": ("b.png", bomb_png, "image/png")}, headers=AUTH).status_code == 413
    assert c.post("/items", files={"file": ("t.txt", b"not an image", "text/plain")}, headers=AUTH).status_code == 415
    big = {"file": ("big.png", b"\0" * 600_000, "image/png")}
    assert c.post("/items", files=big, headers=AUTH).status_code == 413
    r = c.post("/items", files=[("file", ("a.png", png(4), "image/png"))] * 2, data={"label": ["a", "b", "c"]},
               headers=AUTH)
    assert r.status_code == 422 and "3 labels for 2 files" in r.json()["detail"]
    assert c.post("/items", headers=AUTH).status_code == 422
    assert len(index) == 20


def test_busy_server_answers_503_before_reading(predictor_and_index, fresh_index):
    index, _ = fresh_index
    app = create_app(predictor_and_index[0], index, api_key=KEY, workers=1, queue=0)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.get("/health", headers=AUTH)
        gate = app.middleware_stack  # built by the first request: the middlewares, outermost first
        while not hasattr(gate, "capacity"):
            gate = gate.app
        gate.active = gate.capacity  # as if one upload were in progress
        r = c.post("/items", files={"file": ("a.png", png(5), "image/png")}, headers=AUTH)
        assert r.status_code == 503 and r.headers["Retry-After"]
        gate.active = 0


def test_changes_are_saved_when_the_server_stops(predictor_and_index, fresh_index, tmp_path):
    index, path = fresh_index
    app = create_app(predictor_and_index[0], index, api_key=KEY, index_path=path, save_every=0)
    with TestClient(app) as c:
        r = c.post("/items", files={"file": ("a.png", png(6), "image/png")}, data={"label": "cat"}, headers=AUTH)
        assert r.status_code == 201 and r.json()["items"][0]["image_url"] is None, "no items_dir: no image kept"
        assert len(SearchIndex.load(path, log=False)) == 20, "save_every=0: the file is not rewritten yet"
        assert len(SearchIndex.load(path)) == 21, "but the change is in its log"
    assert len(SearchIndex.load(path, log=False)) == 21 and not path.with_name("gallery.index.wal").exists()


def test_the_key_comes_from_the_environment(monkeypatch, checkpoint_dir, fresh_index):
    from deepmetric.serve.cli import build_app, register

    _, path = fresh_index
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(checkpoint_dir), "--index", str(path),
                              "--api-key-env", "MY_SEARCH_KEY", "--save-every", "1"])
    monkeypatch.delenv("MY_SEARCH_KEY", raising=False)
    with pytest.raises(UserError, match="MY_SEARCH_KEY"):
        build_app(args)
    monkeypatch.setenv("MY_SEARCH_KEY", KEY)
    with TestClient(build_app(args), base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        assert c.post("/items", files={"file": ("a.png", png(7), "image/png")}).status_code == 401
        r = c.post("/items", files={"file": ("a.png", png(7), "image/png")}, headers=AUTH)
        assert r.status_code == 201
        assert c.get(r.json()["items"][0]["image_url"], headers=AUTH).content == png(7)
    assert (path.parent / "gallery.index.items").is_dir() and len(SearchIndex.load(path)) == 21
