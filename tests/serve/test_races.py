"""Issue 23, items 1-3 and the design risks, with threads against a live server on loopback: an upload of
a deleted item's bytes keeps its image, an image read racing its delete is whole or 404, slow uploads
leave /search its workers, /health never waits for the index lock, and a faiss-hnsw delete does not
rebuild the graph in the request."""
from __future__ import annotations

import queue
import random
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from deepmetric.inference.index import SearchIndex
from deepmetric.serve import create_app
from serving_helpers import AUTH, KEY, png


@contextmanager
def live(serve, predictor_and_index, tmp_path, backend: str = "faiss-flat", **settings):
    """A keyed server over a copy of the gallery (``backend``), images kept, on a free loopback port;
    ``(url, gallery)``."""
    predictor, index = predictor_and_index
    path = tmp_path / "gallery.index"
    if backend == index.backend_name:
        index.save(path)
    else:
        copy = SearchIndex(index.dim, index.metric, backend, class_names=index.class_names, source=index.source)
        copy.add(index.backend.state()["vectors"], index.labels, list(index.paths))
        copy.save(path)
    app = create_app(predictor, path, api_key=KEY, items_dir=tmp_path / "items", **settings)
    try:
        with serve(app) as url:
            yield url, app.state.items
    finally:
        app.state.items.close()


def add(c: httpx.Client, data: bytes, name: str = "same.png") -> int:
    r = c.post("/items", files={"file": (name, data, "image/png")})
    assert r.status_code == 201, r.text
    return r.json()["items"][0]["id"]


def run_threads(targets, seconds: float) -> None:
    """Run ``targets(deadline)`` in threads; re-raise the first failure."""
    deadline, errors = time.monotonic() + seconds, []

    def guarded(target):
        try:
            target(deadline)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]


def test_an_upload_of_a_deleted_items_bytes_keeps_its_image(serve, predictor_and_index, tmp_path):
    """Item 1: POST /items with the bytes and name of an item being deleted answered 201, and its image was
    unlinked (the add skipped writing a same-named file outside the lock; the delete removed it). Four
    pairs: one thread adds the pair's image again and again and reads each new item's image back, the
    other deletes each item as soon as it was read, racing the next add (before the fix: about a third
    of the adds lost their image)."""
    served = {}  # id -> (status, body intact) of the read right after the add

    def pair(seed: int, url: str, deadline: float) -> None:
        data, added = png(seed), queue.Queue()

        def adder(deadline: float) -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
                while time.monotonic() < deadline:
                    item_id = add(c, data)
                    r = c.get(f"/images/{item_id}")
                    served[item_id] = (r.status_code, r.content == data)
                    added.put(item_id)
            added.put(None)

        def deleter(deadline: float) -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
                for item_id in iter(added.get, None):
                    assert c.delete(f"/items/{item_id}").status_code == 200

        run_threads([adder, deleter], seconds=deadline - time.monotonic())

    with live(serve, predictor_and_index, tmp_path) as (url, gallery):
        run_threads([lambda deadline, k=k: pair(k, url, deadline) for k in range(4)], seconds=1.5)
        assert len(gallery.index) == 20 and not list((tmp_path / "items").glob("*/*.png")), "every image went"
    assert len(served) >= 8 and all(v == (200, True) for v in served.values()), served


def test_an_image_read_racing_its_delete_is_whole_or_404(serve, predictor_and_index, tmp_path):
    """Item 2: GET /images/{id} racing DELETE /items/{id} answered 200 with a truncated body."""
    with live(serve, predictor_and_index, tmp_path) as (url, _):
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            images = {}
            for seed in range(12):
                data = png(100 + seed, size=300)  # ~270 KB: more than one chunk of the response
                images[add(c, data, f"{seed}.png")] = data
        ids, seen = sorted(images), {200: 0, 404: 0}

        def reader(deadline: float) -> None:
            rng = random.Random()
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
                while time.monotonic() < deadline:
                    item_id = rng.choice(ids)
                    r = c.get(f"/images/{item_id}")  # a truncated body raises here
                    assert r.status_code in (200, 404), r.text
                    if r.status_code == 200:
                        assert r.content == images[item_id], item_id
                    else:
                        assert "detail" in r.json()
                    seen[r.status_code] += 1

        def deleter(deadline: float) -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
                for item_id in ids[:-1]:
                    time.sleep(0.05)
                    assert c.delete(f"/items/{item_id}").status_code == 200

        run_threads([reader, reader, reader, deleter], seconds=1.5)
        assert seen[200] and seen[404], seen


def slow_upload(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode() +
              b"\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n")
    return s


def test_slow_uploads_leave_search_its_workers_and_time_out(serve, predictor_and_index, tmp_path):
    """Item 3: with no body-read timeout, workers + queue slow uploads made every /search answer 503 for
    as long as they stayed open."""
    with live(serve, predictor_and_index, tmp_path, workers=1, queue=1, read_timeout=1.5) as (url, _):
        hanging = [slow_upload(url) for _ in range(3)]  # more than workers + queue
        time.sleep(0.2)
        r = httpx.post(f"{url}/search?top_k=3", files={"file": ("q.png", png(7), "image/png")}, headers=AUTH,
                       timeout=30)
        assert r.status_code == 200, r.text
        for s in hanging:
            answer = b"".join(iter(lambda: s.recv(4096), b"")).decode()  # until the server closes it
            assert answer.startswith("HTTP/1.1 408") and "did not arrive whole within 1.5 s" in answer, answer
            s.close()


def test_health_never_waits_for_the_index_lock(serve, predictor_and_index, tmp_path):
    """Design risk: a liveness probe waited behind a slow change (a 3.1 s HNSW rebuild at 30k items)."""
    with live(serve, predictor_and_index, tmp_path) as (url, gallery):
        holding, release = threading.Event(), threading.Event()

        def slow_change() -> None:
            with gallery.lock.writing():
                holding.set()
                release.wait(30)

        t = threading.Thread(target=slow_change)
        t.start()
        try:
            assert holding.wait(30)
            r = httpx.get(f"{url}/health", headers=AUTH, timeout=10)  # answered while the lock is held
            assert r.status_code == 200 and r.json()["index"]["count"] == 20
        finally:
            release.set()
            t.join(30)


def test_hnsw_deletes_are_tombstones_compacted_in_the_background(serve, predictor_and_index, tmp_path):
    """Design risk: a delete from faiss-hnsw rebuilt the graph inside the request, under the lock."""
    with live(serve, predictor_and_index, tmp_path, backend="faiss-hnsw") as (url, gallery):
        backend = gallery.index.backend
        graph = backend.index
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            assert c.delete("/items/0").status_code == 200
            assert backend.index is graph and backend.slots == 20 and len(gallery.index) == 19, "no rebuild"
            hits = c.post("/search?top_k=20", files={"file": ("q.png", png(3), "image/png")}).json()["hits"]
            assert len(hits) == 19 and 0 not in [h["id"] for h in hits]
            for item_id in range(1, 5):  # a quarter of the graph dead: rebuilt by a background thread
                assert c.delete(f"/items/{item_id}").status_code == 200
            deadline = time.monotonic() + 30
            while backend.index is graph and time.monotonic() < deadline:
                time.sleep(0.05)
            assert backend.index is not graph and backend.slots == len(gallery.index) == 15
            hits = c.post("/search?top_k=20", files={"file": ("q.png", png(3), "image/png")}).json()["hits"]
            assert sorted(h["id"] for h in hits) == list(range(5, 20))
