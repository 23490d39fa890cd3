"""Issue 23, items 3-7: what a client was told is what a restart finds. SIGKILLs at random points in a
burst of changes lose no acknowledged add and bring back no acknowledged delete; SIGTERM and a second
Ctrl-C save within a bound even with an upload hanging; a full or read-only disk answers 5xx with JSON
and changes nothing; a served index refuses offline edits; a restart removes what crashes left."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from deepmetric.cli import main
from deepmetric.core.errors import UserError
from deepmetric.inference import index_file
from deepmetric.inference.index import SearchIndex
from deepmetric.serve import create_app
from deepmetric.serve import item_files

from serving_helpers import AUTH, KEY, ServerProcess, png


def served_copy(onnx_gallery, tmp_path, backend: str):
    """``(model.onnx, INDEX)``: the ONNX gallery re-indexed with ``backend`` in ``tmp_path`` (no PyTorch
    in the server: the exact backend would import it)."""
    model, exact = onnx_gallery
    src = SearchIndex.load(exact)
    index = SearchIndex(src.dim, src.metric, backend, class_names=src.class_names, source=src.source)
    index.add(src.backend.state()["vectors"], src.labels, list(src.paths))
    return model, index.save(tmp_path / "gallery.index")


def our_files(items_dir):
    return sorted(str(p) for p in items_dir.rglob("*") if p.is_file() and p.name != item_files.MARKER)


def churn(url: str, images: dict, removed: set, tried: set, seconds: float, kill) -> None:
    """Three adders and a deleter against ``url`` for ``seconds``, then ``kill()`` with requests in flight.
    ``images`` gets ``id -> bytes`` of every add answered 201, ``removed`` every delete answered 200,
    ``tried`` every delete sent (one cut off by the kill may or may not have happened)."""
    stop, lock, seeds, wrong = threading.Event(), threading.Lock(), iter(range(10 ** 6, 2 * 10 ** 6)), []

    def adder() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
            while not stop.is_set():
                with lock:
                    data = png(next(seeds), size=24)
                try:
                    r = c.post("/items", files={"file": ("burst.png", data, "image/png")})
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    with lock:
                        images[r.json()["items"][0]["id"]] = data
                elif r.status_code != 503:
                    wrong.append(r.text)

    def deleter() -> None:
        rng = random.Random(5)
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
            while not stop.is_set():
                with lock:
                    candidates = sorted(set(images) - tried)
                if len(candidates) < 3:
                    time.sleep(0.01)
                    continue
                victim = rng.choice(candidates[:-1])
                with lock:
                    tried.add(victim)
                try:
                    r = c.delete(f"/items/{victim}")
                except httpx.HTTPError:
                    return
                if r.status_code not in (200, 503):
                    wrong.append(r.text)
                if r.status_code == 200:
                    with lock:
                        removed.add(victim)

    threads = [threading.Thread(target=f) for f in (adder, adder, adder, deleter)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert not wrong, wrong


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-hnsw"])
def test_sigkill_in_a_burst_loses_no_acknowledged_change(onnx_gallery, tmp_path, backend):
    """Items 5 and 7: with --save-every 5 most changes live only in the log when the server dies."""
    model, path = served_copy(onnx_gallery, tmp_path, backend)
    images, removed, tried, rng = {}, set(), set(), random.Random(23)
    for _ in range(3):
        with ServerProcess(model, path, "--save-every", "5", log=tmp_path / "server.log") as server:
            churn(server.url, images, removed, tried, rng.uniform(0.3, 1.0), server.proc.kill)
        live = set(SearchIndex.load(path).ids.tolist())  # what the next start serves: the file and its log
        assert set(images) - tried <= live, f"acknowledged adds lost: {sorted(set(images) - tried - live)}"
        assert not removed & live, f"acknowledged deletes came back: {sorted(removed & live)}"
    assert len(images) >= 10 and removed, (len(images), len(removed))
    with ServerProcess(model, path, log=tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
            assert c.get("/health").json()["index"]["count"] == len(SearchIndex.load(path))
            present = set(SearchIndex.load(path).ids.tolist())
            for item_id in sorted(set(images) & present):
                r = c.get(f"/images/{item_id}")
                assert r.status_code == 200 and r.content == images[item_id], item_id
            for item_id in sorted(set(images) - present):
                assert c.get(f"/images/{item_id}").status_code == 404
        index = SearchIndex.load(path)
        items = tmp_path / "gallery.index.items"
        assert our_files(items) == sorted(p for p in index.paths if p and p.startswith(str(items)))  # no orphans
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert server.stop(signal.SIGTERM) == 0
    assert not (tmp_path / "gallery.index.wal").exists()


def slow_upload(url: str) -> socket.socket:
    """A POST /search whose body never finishes: headers and the first bytes only."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode() +
              b"\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n")
    return s


def test_stopping_is_bounded_and_saves(onnx_gallery, tmp_path):
    """Item 3: an unfinished upload held SIGTERM for 30 s and more, a second Ctrl-C skipped the save, and
    --save-every 0 lost every change. Now SIGTERM waits for the upload at most --read-timeout, and a
    second signal stops the waiting, never the save."""
    model, path = served_copy(onnx_gallery, tmp_path, "faiss-flat")
    log = tmp_path / "server.log"
    for signals, args in (([signal.SIGTERM], ["--read-timeout", "2", "--shutdown-timeout", "20"]),
                          ([signal.SIGINT, signal.SIGINT], ["--read-timeout", "60", "--shutdown-timeout", "60"])):
        with ServerProcess(model, path, "--save-every", "0", *args, log=log) as server:
            r = httpx.post(f"{server.url}/items", files={"file": ("a.png", png(len(signals)), "image/png")},
                           headers=AUTH, timeout=30)
            assert r.status_code == 201, r.text
            hanging = slow_upload(server.url)
            time.sleep(0.3)
            start = time.monotonic()
            for sig in signals:
                server.proc.send_signal(sig)
                time.sleep(0.3)
            assert server.proc.wait(30) == 0, log.read_text()[-2000:]
            assert time.monotonic() - start < 15, "bounded: the hanging upload no longer holds the server"
            hanging.close()
        saved = SearchIndex.load(path, log=False)  # the file itself, not its log
        assert r.json()["items"][0]["id"] in saved.ids.tolist() and not (tmp_path / "gallery.index.wal").exists()
    assert "Traceback" not in log.read_text()


# -- in-process: the disk refuses ------------------------------------------------------------------------

@pytest.fixture
def keyed(predictor_and_index, tmp_path):
    """A TestClient of a keyed server over a copy of the gallery, images kept, the file saved every change."""
    path = predictor_and_index[1].save(tmp_path / "gallery.index")
    app = create_app(predictor_and_index[0], path, api_key=KEY, items_dir=tmp_path / "items", save_every=1)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, app.state.items, path, tmp_path / "items"


class FailingFile:
    """A log file whose writes stop half-way with ``error`` (and, with ``stuck``, cannot be cut back)."""

    def __init__(self, real, error: int, stuck: bool = False) -> None:
        self.real, self.error, self.stuck = real, error, stuck

    def write(self, data: bytes) -> int:
        self.real.write(data[:len(data) // 2])
        self.real.flush()
        raise OSError(self.error, os.strerror(self.error))

    def truncate(self, size: int) -> int:
        if self.stuck:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.real.truncate(size)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def search_ids(c, data: bytes):
    return [h["id"] for h in c.post("/search?top_k=30", files={"file": ("q.png", data, "image/png")},
                                    headers=AUTH).json()["hits"]]


@pytest.mark.parametrize("error,status", [(errno.ENOSPC, 507), (errno.EROFS, 500)])
def test_a_refused_log_write_answers_5xx_and_changes_nothing(keyed, monkeypatch, error, status):
    """Item 4: the add answered a plain-text 500 yet was searchable until a restart; a failed delete
    removed the item until a restart."""
    c, gallery, path, items = keyed
    gallery.save_every = 0  # no background save replaces the log file under the fault
    kept = c.post("/items", files={"file": ("kept.png", png(1), "image/png")}, headers=AUTH).json()["items"][0]["id"]
    real = gallery.log._file
    monkeypatch.setattr(gallery.log, "_file", FailingFile(real, error))
    r = c.post("/items", files={"file": ("lost.png", png(2), "image/png")}, headers=AUTH)
    assert r.status_code == status and "nothing was changed" in r.json()["detail"], r.text
    d = c.delete(f"/items/{kept}", headers=AUTH)
    assert d.status_code == status and "nothing was changed" in d.json()["detail"], d.text
    monkeypatch.setattr(gallery.log, "_file", real)
    assert len(gallery.index) == 21 and c.get("/health", headers=AUTH).json()["index"]["count"] == 21
    assert kept in search_ids(c, png(1)) and 21 not in search_ids(c, png(2))
    assert c.get(f"/images/{kept}", headers=AUTH).content == png(1)
    assert our_files(items) == [gallery.index.path_of(kept)], "the refused upload's image is not kept"
    again = c.post("/items", files={"file": ("next.png", png(3), "image/png")}, headers=AUTH)
    assert again.status_code == 201 and again.json()["items"][0]["id"] == 21  # the log is whole again
    assert SearchIndex.load(path).ids.tolist()[-2:] == [kept, 21]


def test_a_refused_image_write_or_save(keyed, monkeypatch, caplog):
    """A read-only items folder refuses the add (nothing changed); a file save that fails after the
    change is logged only warns: the change is durable in the log and replayed."""
    c, gallery, path, items = keyed

    def read_only(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(item_files, "write_new_file", read_only)
    r = c.post("/items", files={"file": ("a.png", png(4), "image/png")}, headers=AUTH)
    assert r.status_code == 500 and "Read-only file system" in r.json()["detail"] and len(gallery.index) == 20
    monkeypatch.undo()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(index_file, "atomic_write", disk_full)
    gallery.save_every = 0  # the save below, not one in the background
    r = c.post("/items", files={"file": ("b.png", png(5), "image/png")}, headers=AUTH)
    assert r.status_code == 201 and gallery.save() is False and "the changes stay in" in caplog.text
    monkeypatch.undo()
    assert len(SearchIndex.load(path, log=False)) == 20 and len(SearchIndex.load(path)) == 21


def test_a_log_that_cannot_be_repaired_stops_changes(keyed, monkeypatch):
    c, gallery, path, _ = keyed
    gallery.save_every = 0
    monkeypatch.setattr(gallery.log, "_file", FailingFile(gallery.log._file, errno.ENOSPC, stuck=True))
    assert c.post("/items", files={"file": ("a.png", png(6), "image/png")}, headers=AUTH).status_code == 507
    monkeypatch.undo()
    r = c.delete("/items/3", headers=AUTH)
    assert r.status_code == 503 and "restart the server" in r.json()["detail"]
    assert len(SearchIndex.load(path)) == 20, "the torn record at the end is ignored"


def test_acknowledged_changes_survive_a_crash_between_saves(predictor_and_index, tmp_path):
    """Item 5: with --save-every 10 a crash lost up to 9 changes, deletes included, which came back
    without their images. A crash here is the process ending with the gallery never closed."""
    path = predictor_and_index[1].save(tmp_path / "gallery.index")
    app = create_app(predictor_and_index[0], path, api_key=KEY, items_dir=tmp_path / "items", save_every=10)
    c = TestClient(app, raise_server_exceptions=False)  # no `with`: the lifespan never closes it
    added = [c.post("/items", files={"file": (f"{i}.png", png(10 + i), "image/png")}, headers=AUTH).json()
             ["items"][0]["id"] for i in range(4)]
    image = app.state.items.index.path_of(added[1])
    assert [c.delete(f"/items/{i}", headers=AUTH).status_code for i in (added[1], 5)] == [200, 200]
    on_disk = SearchIndex.load(path)
    assert on_disk.ids.tolist() == app.state.items.index.ids.tolist()
    assert added[1] not in on_disk.ids and 5 not in on_disk.ids and len(SearchIndex.load(path, log=False)) == 20
    assert not os.path.exists(image), "a removed item's image goes once the removal is durable"
    app.state.items.owner.release()  # what the kernel does for a killed process
    restarted = create_app(predictor_and_index[0], path, api_key=KEY, items_dir=tmp_path / "items")
    assert restarted.state.items.index.ids.tolist() == on_disk.ids.tolist()
    assert len(SearchIndex.load(path, log=False)) == 22, "the restart saved what it replayed"
    restarted.state.items.close()


# -- in-process: ownership and leftovers ---------------------------------------------------------------

def features(path, dim: int = 16):
    vectors = np.random.default_rng(0).standard_normal((2, dim)).astype(np.float32)
    np.savez(path, vectors=vectors, labels=np.array([0, 1]), paths=np.array(["/x/a.jpg", "/x/b.jpg"]),
             class_names=np.array(["class_00", "class_01"]), meta=np.array(json.dumps({})))
    return str(path)


def test_offline_edits_of_a_served_index_are_refused(predictor_and_index, tmp_path, capsys):
    """Item 6: `index add/remove` on a served index exited 0, the server's next save reverted them and an
    id was given to another image."""
    path = predictor_and_index[1].save(tmp_path / "gallery.index")
    f = features(tmp_path / "new.npz")
    app = create_app(predictor_and_index[0], path, api_key=KEY)
    for argv in (["index", "add", "--index", str(path), "--embeddings", f], ["index", "remove", "--index", str(path),
                 "--ids", "3"], ["index", "build", "--embeddings", f, "--output", str(path)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {os.getpid()}" in err[0] and "stop the server" in err[0], err
    with pytest.raises(UserError, match="already served by another"):
        create_app(predictor_and_index[0], path, api_key=KEY)
    app.state.items.close()
    assert main(["index", "remove", "--index", str(path), "--ids", "3"]) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".gallery.index.lock").write_text(json.dumps({"pid": int(dead.stdout), "role": "serve"}))
    assert main(["index", "remove", "--index", str(path), "--ids", "4"]) == 0, "a dead server's lock is taken over"
    assert SearchIndex.load(path).ids.tolist()[:4] == [0, 1, 2, 5]


def test_a_start_removes_stale_temporary_files_and_orphaned_images(predictor_and_index, tmp_path):
    """Item 7: .INDEX.*.tmp files and orphaned image files were never cleaned up."""
    path = predictor_and_index[1].save(tmp_path / "gallery.index")
    items = tmp_path / "items"
    app = create_app(predictor_and_index[0], path, api_key=KEY, items_dir=items)
    with TestClient(app) as c:
        kept = [c.post("/items", files={"file": (f"{i}.png", png(20 + i), "image/png")}, headers=AUTH).json()
                for i in range(2)]
    referenced = our_files(items)
    stale = [tmp_path / ".gallery.index.0a1b2c3d.tmp", tmp_path / ".gallery.index.wal.4e5f6a7b.tmp",
             items / "0123456789abcdef" / "orphan.png", items / "fedcba9876543210" / ".x.png.0a1b2c3d.tmp",
             items / os.path.basename(os.path.dirname(referenced[0])) / ".y.png.0a1b2c3d.tmp"]
    foreign = [tmp_path / "notes.tmp", items / "readme.txt", items / "holiday" / "beach.png"]
    for p in stale + foreign:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"left over")
    app = create_app(predictor_and_index[0], path, api_key=KEY, items_dir=items)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in foreign + [items / item_files.MARKER])
    assert [p for p in our_files(items) if "holiday" not in p and "readme" not in p] == referenced
    with TestClient(app) as c:
        for body in kept:
            item = body["items"][0]
            assert c.get(item["image_url"], headers=AUTH).status_code == 200


def test_an_items_dir_of_another_index_is_refused(predictor_and_index, tmp_path):
    first = predictor_and_index[1].save(tmp_path / "a.index")
    second = predictor_and_index[1].save(tmp_path / "b.index")
    create_app(predictor_and_index[0], first, api_key=KEY, items_dir=tmp_path / "shared").state.items.close()
    with pytest.raises(UserError, match="holds the images of another index"):
        create_app(predictor_and_index[0], second, api_key=KEY, items_dir=tmp_path / "shared")


def test_a_keyed_server_on_a_read_only_folder_is_one_line_at_start(predictor_and_index, tmp_path, monkeypatch):
    """Item 4 at start: a server that may change the index needs to write its log; without a key it
    serves a read-only folder as before."""
    from deepmetric.inference import index_log

    path = predictor_and_index[1].save(tmp_path / "gallery.index")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(index_log, "atomic_write", read_only)
    with pytest.raises(UserError, match="cannot write the index or its change log there .Read-only file system"):
        create_app(predictor_and_index[0], path, api_key=KEY)
    create_app(predictor_and_index[0], path).state.items.close()  # no key: nothing to write
    monkeypatch.undo()
    create_app(predictor_and_index[0], path, api_key=KEY).state.items.close()  # the lock was let go
