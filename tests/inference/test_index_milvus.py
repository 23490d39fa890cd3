"""The Milvus index (``deepmetric.inference.milvus_backend``) on Milvus Lite files: built, it finds what
exact search finds; its filters (labels, cameras, the re-ID same-identity same-camera exclusion) give
what a mask over exact search gives; adds and removes keep ids stable and are found again after a
restart; the CLI builds, changes and searches it; bad input is one line with exit code 2."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import require_module

require_module("pymilvus", "the milvus extra")
require_module("milvus_lite", "the milvus extra")

from deepmetric.cli import main  # noqa: E402
from deepmetric.core.embeddings import EmbeddingSet  # noqa: E402
from deepmetric.inference import milvus_store  # noqa: E402
from deepmetric.inference.filters import ItemFilter  # noqa: E402
from deepmetric.inference.index import SearchIndex, SearchIndexError, UnknownItemError  # noqa: E402
from deepmetric.inference.milvus_backend import MilvusIndex  # noqa: E402
from deepmetric.inference.stores import open_index  # noqa: E402

D, N = 16, 120
NAMES = [f"person_{i:02d}" for i in range(8)]


@pytest.fixture(scope="module")
def data():
    """``N`` unit vectors in 8 identities, 3 cameras, with paths: no two scores tie."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((len(NAMES), D))
    labels = np.arange(N) % len(NAMES)
    x = (centres[labels] + 0.8 * rng.standard_normal((N, D))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cams = (np.arange(N) // len(NAMES)) % 3
    paths = [f"/photos/{NAMES[lab]}/{i}.jpg" for i, lab in enumerate(labels)]
    return EmbeddingSet(x, labels, cams, paths)


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    """One FLAT (exact) Milvus Lite index of ``data``, shared by the tests that only search it."""
    index = MilvusIndex.build(data, str(tmp_path_factory.mktemp("milvus") / "gallery.db"), class_names=NAMES,
                              source={"model": "model-a"}, index_type="FLAT")
    yield index
    index.close()


def masked_topk(data, queries, k, keep):
    """Exact cosine search with a mask: ``keep (Q, N)`` bool -> the paths of each query's top k."""
    scores = queries @ data.vectors.numpy().T
    scores[~keep] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[data.paths[j] for j in row if keep[i, j]] for i, row in enumerate(order)]


def test_build_finds_what_exact_search_finds(built, data):
    assert len(built) == N and built.dim == D and built.info()["backend"] == "milvus"
    exact = SearchIndex.build(data, class_names=NAMES)
    q = data.vectors.numpy()[:10] + 0.01
    for ours, theirs in zip(built.search(q, k=5), exact.search(q, k=5)):
        assert [h.path for h in ours] == [h.path for h in theirs]
        assert [h.label_name for h in ours] == [h.label_name for h in theirs]
        assert [h.label for h in ours] == [h.label for h in theirs], "labels keep the embeddings' numbering"
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-5)


def test_reid_exclusion_is_a_filter_equal_to_the_mask(built, data):
    """Each query drops its own identity seen by its own camera: one Milvus filter per query gives what
    the evaluation's post-hoc mask over exact search gives."""
    rng = np.random.default_rng(1)
    rows = rng.choice(N, 12, replace=False)
    q, q_lab, q_cam = data.vectors.numpy()[rows], data.labels[rows], data.camids[rows]
    junk = (data.labels[None, :] == q_lab[:, None]) & (data.camids[None, :] == q_cam[:, None])
    expected = masked_topk(data, q, 10, ~junk)
    filters = [ItemFilter.reid(lab, cam) for lab, cam in zip(q_lab, q_cam)]
    got = built.search(q, k=10, filter=filters)
    assert [[h.path for h in hits] for hits in got] == expected
    assert all(h.path != data.paths[r] for hits, r in zip(got, rows) for h in hits), "a query never finds itself"


def test_label_and_camera_filters_equal_the_mask(built, data):
    q = data.vectors.numpy()[:6] + 0.02
    only = ItemFilter(only={"label": [2, 5], "camera": 1})
    keep = np.isin(data.labels, [2, 5]) & (data.camids == 1)
    assert [[h.path for h in hits] for hits in built.search(q, k=4, filter=only)] == \
        masked_topk(data, q, 4, np.broadcast_to(keep, (len(q), N)).copy())
    by_name = built.search(q, k=3, filter=ItemFilter(only={"label_name": "person_03"}))
    assert {h.label_name for hits in by_name for h in hits} == {"person_03"}
    expr = built.search(q[:1], k=50, filter="camera == 2 and label != 0")[0]  # a Milvus expression as it is
    assert len(expr) == int(((data.camids == 2) & (data.labels != 0)).sum())
    # an index file filters the same fields (but keeps no cameras)
    exact = SearchIndex.build(data, class_names=NAMES)
    ids = exact.search(q, k=4, filter=ItemFilter(only={"label": [2, 5]}))
    assert [[h.path for h in hits] for hits in ids] == masked_topk(
        data, q, 4, np.broadcast_to(np.isin(data.labels, [2, 5]), (len(q), N)).copy())
    with pytest.raises(SearchIndexError, match="keeps no camera ids"):
        exact.search(q, k=4, filter=ItemFilter.reid(1, 1))


def test_add_remove_restart(data, tmp_path):
    db = str(tmp_path / "live.db")
    index = MilvusIndex.build(data, db, class_names=NAMES, index_type="FLAT")
    first = sorted(int(i) for i in index.search_arrays(data.vectors.numpy(), k=1)[1][:, 0])
    new = np.eye(3, D, dtype=np.float32)
    ids = index.add(new, labels=[0, 1, 1], paths=["/new/a.jpg", "/new/b.jpg", "/new/c.jpg"],
                    class_names=["zebra", "person_02"], camids=[0, 1, 2])
    assert min(ids) > max(first) and len(index) == N + 3
    assert index.items(ids) == [(int(ids[0]), 8, "zebra", "/new/a.jpg"), (int(ids[1]), 2, "person_02", "/new/b.jpg"),
                                (int(ids[2]), 2, "person_02", "/new/c.jpg")]
    hit = index.search(new[0], k=1)[0][0]
    assert (hit.id, hit.label_name) == (int(ids[0]), "zebra")
    gone = index.remove(ids=[int(ids[1])], paths=[data.paths[0]])
    assert gone.tolist() == sorted([int(ids[1]), first[0]])
    assert index.remove(labels=["zebra"]).tolist() == [int(ids[0])]
    with pytest.raises(UnknownItemError, match="never reused"):
        index.remove(ids=[int(ids[1])])
    with pytest.raises(SearchIndexError, match="remove all"):
        index.select(labels=list(range(len(NAMES))) + ["person_02"])
    index.close()  # the restart: Milvus Lite lets go of the file and opens it again from disk

    again = open_index(f"milvus://{db}")
    assert len(again) == N + 3 - 3
    assert again.items([int(ids[2])]) == [(int(ids[2]), 2, "person_02", "/new/c.jpg")]
    assert [h.id for h in again.search(new[2], k=1)[0]] == [int(ids[2])]
    more = again.add(new[:1], labels=[0], class_names=["zebra"])
    assert int(more[0]) > int(ids[-1]), "ids of removed items are never reused"
    assert again.items(more)[0][1:3] == (8, "zebra"), "a class name keeps its label after a restart"
    again.close()


def features(path, es, names, model="model-a", camids=True):
    np.savez(path, vectors=es.vectors.numpy(), labels=es.labels, paths=np.array(es.paths), class_names=np.array(names),
             meta=np.array(json.dumps({"model": model})),
             **({"camids": es.camids} if camids and es.camids is not None else {}))
    return str(path)


def test_cli_build_info_add_remove_search(data, tmp_path, capsys, checkpoint_dir, image_folder):
    npz = features(tmp_path / "f.npz", data, NAMES)
    db = tmp_path / "cli.db"
    assert main(["index", "build", "--embeddings", npz, "--backend", "milvus", "--uri", str(db),
                 "--param", "index_type=FLAT"]) == 0
    out = capsys.readouterr().out
    assert f"milvus cosine index of {N} vectors" in out and f"--index milvus://{db}" in out
    spec = f"milvus://{db}"
    assert main(["index", "info", spec]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["count"], info["dim"], info["params"]["index_type"]) == (N, D, "FLAT")
    extra = EmbeddingSet(np.eye(2, D, dtype=np.float32), [0, 0], [1, 1], ["/x/1.jpg", "/x/2.jpg"])
    assert main(["index", "add", "--index", spec, "--embeddings", features(tmp_path / "g.npz", extra, ["newcomer"])]) == 0
    assert f"now {N + 2} items" in capsys.readouterr().out
    assert main(["index", "remove", "--index", spec, "--labels", "newcomer", "--paths", data.paths[3]]) == 0
    assert capsys.readouterr().out.strip().endswith(f"now {N - 1} items")

    # search with the tiny 16-d model: a gallery of its own embeddings, then a query filtered by a label
    from deepmetric.inference.predictor import Predictor, list_inputs

    predictor = Predictor.from_checkpoint(checkpoint_dir)
    inputs = list_inputs(image_folder)
    es = predictor.embed_list(inputs.paths, inputs.labels, progress=False)
    gallery = features(tmp_path / "gallery.npz", es, inputs.class_names, model=predictor.fingerprint, camids=False)
    assert main(["index", "build", "--embeddings", gallery, "--backend", "milvus", "--uri", str(tmp_path / "img.db")]) == 0
    capsys.readouterr()
    query = inputs.paths[0]
    assert main(["search", "--index", f"milvus://{tmp_path / 'img.db'}", "--checkpoint", str(checkpoint_dir),
                 "--query", query, "--top-k", "3", "--json", "--filter", "label != 0"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert len(hits) == 3 and all(h["label"] != 0 for h in hits)
    assert main(["search", "--index", f"milvus://{tmp_path / 'img.db'}", "--checkpoint", str(checkpoint_dir),
                 "--query", query, "--top-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["hits"][0]["path"] == query


def one_line_error(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("deepmetric: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_is_one_line(data, tmp_path, capsys, monkeypatch, checkpoint_dir):
    npz = features(tmp_path / "f.npz", data, NAMES)
    db = tmp_path / "e.db"
    build = ["index", "build", "--embeddings", npz, "--backend", "milvus"]
    one_line_error(build, capsys, "--uri")
    one_line_error([*build, "--uri", str(tmp_path / "gallery.txt")], capsys, "ending in .db")
    one_line_error([*build, "--uri", str(tmp_path / "no" / "such" / "g.db")], capsys, "does not exist")
    one_line_error([*build, "--uri", str(db), "--metric", "squared_euclidean"], capsys, "only cosine")
    one_line_error([*build, "--uri", str(db), "--centroids"], capsys, "--centroids")
    one_line_error([*build, "--uri", str(db), "--param", "index_type=BTREE"], capsys, "index_type")
    assert main([*build, "--uri", str(db), "--param", "index_type=FLAT"]) == 0
    one_line_error([*build, "--uri", str(db)], capsys, "exists already", "--replace")
    assert main([*build, "--uri", str(db), "--replace"]) == 0
    capsys.readouterr()
    spec = f"milvus://{db}"
    one_line_error(["index", "info", f"{spec}/shoes"], capsys, "no collection 'shoes'", "gallery")
    one_line_error(["index", "info", f"milvus://{tmp_path / 'missing.db'}"], capsys, "no Milvus Lite file")
    one_line_error(["index", "info", "milvus://"], capsys, "expected milvus://")
    one_line_error(["index", "info", "milvus://host:99999/x"], capsys, "not a Milvus address")
    small = EmbeddingSet(np.ones((2, 8), np.float32), [0, 1], None, ["/a.jpg", "/b.jpg"])
    one_line_error(["index", "add", "--index", spec, "--embeddings", features(tmp_path / "s.npz", small, NAMES)],
                   capsys, "8")  # the index holds 16-d vectors
    other = features(tmp_path / "o.npz", data, NAMES, model="model-b")
    one_line_error(["index", "add", "--index", spec, "--embeddings", other], capsys, "model-b", "not comparable")
    small_db = tmp_path / "small.db"
    assert main(["index", "build", "--embeddings", features(tmp_path / "s8.npz", small, NAMES), "--backend", "milvus",
                 "--uri", str(small_db)]) == 0
    capsys.readouterr()
    one_line_error(["search", "--index", f"milvus://{small_db}", "--checkpoint", str(checkpoint_dir), "--query", "x.jpg"],
                   capsys, "8-d vectors", "16-d")
    one_line_error(["index", "remove", "--index", spec, "--ids", "987654"], capsys, "no item with id 987654")


def test_an_unreachable_server_fails_within_the_timeout(data, tmp_path, capsys, monkeypatch):
    """A server that accepts connections and never answers: one line once the connect timeout passes."""
    monkeypatch.setattr(milvus_store, "CONNECT_TIMEOUT_S", 1.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        start = time.monotonic()
        err = one_line_error(["index", "info", f"milvus://127.0.0.1:{silent.getsockname()[1]}/gallery"], capsys,
                             "not reachable", "within 1 s")
        assert time.monotonic() - start < 4, err
    finally:
        silent.close()


def test_a_lite_file_open_in_another_process_is_one_line(data, tmp_path, capsys):
    """Milvus Lite opens a file in one process at a time: another process (a running server) holds it."""
    db = str(tmp_path / "held.db")
    MilvusIndex.build(data, db, class_names=NAMES, index_type="FLAT").close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from deepmetric.inference.milvus_backend import MilvusIndex
        index = MilvusIndex.open("milvus://{db}")
        print("open", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        one_line_error(["index", "remove", "--index", f"milvus://{db}", "--ids", "1"], capsys,
                       "another process has it open", "POST /items")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
