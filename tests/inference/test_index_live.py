"""A live gallery (issue 15): add and remove on every backend, stable ids, centroid updates, class-name
mapping, the exact backend's agreement with evaluation.neighbors, durability under faults, missing FAISS."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from deepmetric.evaluation.neighbors import topk_neighbors
from deepmetric.inference import EmbeddingSet
from deepmetric.inference import index_file
from deepmetric.inference.index import (FaissMissingError, SearchIndex, SearchIndexError, UnknownItemError,
                                        edit_index)

D, C = 16, 10


@pytest.fixture(scope="module")
def data():
    """600 clustered vectors (the first 500 are the gallery, the last 100 arrive later) and 30 queries."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((C, D)).astype(np.float32) * 3
    labels = rng.integers(0, C, 600)
    x = centres[labels] + rng.standard_normal((600, D)).astype(np.float32)
    q = centres[rng.integers(0, C, 30)] + rng.standard_normal((30, D)).astype(np.float32)
    return x, labels, [f"/gallery/{i}.jpg" for i in range(600)], q


def brute_ids(x, q, k, metric):
    """Nearest rows of ``x`` in float64, ties by lower row."""
    if metric == "cosine":
        s = -(q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float64) @ \
            (x / np.linalg.norm(x, axis=1, keepdims=True)).T.astype(np.float64)
    else:
        s = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(s, axis=1, kind="stable")[:, :k]


def recall(got, truth):
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(got, truth)]))


REMOVED = np.r_[0:40, 100:160:3, 499]  # a block at the start, a scatter, the last id


def live(backend, metric, data, **params):
    """Items 0..499, then REMOVED removed, then items 500..599 added: ids 0..599 with REMOVED missing."""
    x, labels, paths, _ = data
    index = SearchIndex(D, metric, backend, **params)
    assert index.add(x[:500], labels[:500], paths[:500]).tolist() == list(range(500))
    assert index.remove(ids=REMOVED).tolist() == REMOVED.tolist()
    assert index.add(x[500:], labels[500:], paths[500:]).tolist() == list(range(500, 600))
    return index


def remaining(data):
    keep = np.setdiff1d(np.arange(600), REMOVED)
    return keep, data[0][keep]


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
def test_exact_backends_equal_a_fresh_build_over_the_remaining_items(data, backend, metric):
    keep, xr = remaining(data)
    index = live(backend, metric, data)
    fresh = SearchIndex(D, metric, backend)
    fresh.add(xr)
    s_live, ids_live = index.search_arrays(data[3], 10)
    s_fresh, rows_fresh = fresh.search_arrays(data[3], 10)
    np.testing.assert_array_equal(ids_live, keep[rows_fresh])  # the same items, reported by stable id
    np.testing.assert_allclose(s_live, s_fresh, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ids_live, keep[brute_ids(xr, data[3], 10, metric)])
    assert not np.isin(ids_live, REMOVED).any() and len(index) == len(keep)


@pytest.mark.parametrize("backend,params", [("faiss-ivf", {"nlist": 8}),
                                            ("faiss-ivfpq", {"nlist": 8, "m": 4, "nbits": 4, "refine": 600})])
def test_ivf_with_every_list_probed_is_exact_after_add_and_remove(data, backend, params):
    """All lists probed (and, for PQ, every candidate re-ranked exactly) search everything: the lists
    after add and remove must hold exactly the remaining items."""
    keep, xr = remaining(data)
    index = live(backend, "squared_euclidean", data, nprobe=8, **params)
    np.testing.assert_array_equal(index.search_arrays(data[3], 10)[1], keep[brute_ids(xr, data[3], 10, "squared_euclidean")])


@pytest.mark.parametrize("backend,params,bound", [("faiss-ivf", {"nlist": 8, "nprobe": 3}, 0.9),
                                                  ("faiss-hnsw", {"M": 8}, 0.95),
                                                  ("faiss-ivfpq", {"nlist": 8, "nprobe": 3, "refine": 8}, 0.85)])
def test_approximate_backends_keep_their_recall(data, tmp_path, backend, params, bound):
    keep, xr = remaining(data)
    truth = keep[brute_ids(xr, data[3], 10, "cosine")]
    index = live(backend, "cosine", data, **params)
    loaded = SearchIndex.load(index.save(tmp_path / "g.index"))
    for idx in (index, loaded):
        ids = idx.search_arrays(data[3], 10)[1]
        assert recall(ids, truth) >= bound and not np.isin(ids, REMOVED).any()
    np.testing.assert_array_equal(loaded.search_arrays(data[3], 10)[1], index.search_arrays(data[3], 10)[1])


def test_ids_are_stable_and_never_reused(data, tmp_path):
    x, labels, paths, _ = data
    index = SearchIndex(D, "cosine", "faiss-hnsw")
    index.add(x[:5], labels[:5], paths[:5])
    index.remove(ids=[1, 4])  # the highest id too
    index = SearchIndex.load(index.save(tmp_path / "g.index"))
    assert index.ids.tolist() == [0, 2, 3] and index.next_id == 5
    assert index.add(x[5:7]).tolist() == [5, 6]
    hit = index.search(x[2], k=1)[0][0]
    assert (hit.id, hit.path, hit.label) == (2, paths[2], labels[2]) and index.path_of(3) == paths[3]
    with pytest.raises(UnknownItemError, match="no item with id 4"):
        index.path_of(4)


def test_remove_by_path_label_and_name(data, tmp_path, monkeypatch):
    x = data[0][:6]
    index = SearchIndex(D, class_names=["mug", "kettle", "cup"])
    index.add(x, [0, 1, 2, 0, 1, 2], [str(tmp_path / f"{i}.jpg") for i in range(6)])
    monkeypatch.chdir(tmp_path)
    assert index.remove(paths=["1.jpg"]).tolist() == [1]  # relative to the working folder, or as stored
    assert index.remove(labels=["mug"], ids=[5]).tolist() == [0, 3, 5]  # a union
    assert index.remove(labels=[1]).tolist() == [4] and index.ids.tolist() == [2]
    for kwargs, match in [({"ids": [99]}, "no item with id 99"), ({"paths": ["nope.jpg"]}, "no item with path nope.jpg"),
                          ({"labels": ["teapot"]}, "no item has label teapot"), ({"labels": [0]}, "no item has label 0")]:
        with pytest.raises(UnknownItemError, match=match):
            index.remove(**kwargs)
    with pytest.raises(SearchIndexError, match="would remove all 1 items"):
        index.remove(ids=[2])
    with pytest.raises(SearchIndexError, match="by ids, paths or labels"):
        index.remove()
    with pytest.raises(SearchIndexError, match="must be integers"):
        index.remove(ids=[2.5])
    assert index.ids.tolist() == [2]


def test_add_maps_class_names_onto_the_index(data):
    x = data[0]
    index = SearchIndex(D, class_names=["mug", "kettle"])
    index.add(x[:2], [0, 1])
    index.add(x[2:5], [0, 1, -1], class_names=["kettle", "teapot"])  # another folder's own numbering
    assert index.labels.tolist() == [0, 1, 1, 2, -1] and index.class_names == ["mug", "kettle", "teapot"]
    assert index.search(x[3], k=1)[0][0].label_name == "teapot"
    unnamed = SearchIndex(D)
    unnamed.add(x[:2], [4, 5])
    with pytest.raises(SearchIndexError, match="labels but no class names"):
        unnamed.add(x[2:3], [0], class_names=["mug"])
    with pytest.raises(SearchIndexError, match="labels are >= 0, or -1"):
        unnamed.add(x[2:3], [-3])


@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
def test_centroids_after_add_equal_a_build_over_all_members(data, backend, metric):
    x, labels, paths, q = data
    first, later = labels[:500] < 6, labels[500:] >= 3  # labels 0-5 first; 3-9 later: 3-5 updated, 6-9 new
    es = lambda rows, lab: EmbeddingSet(torch.from_numpy(x[rows]), lab, paths=[paths[i] for i in rows])  # noqa: E731
    rows_a, rows_b = np.flatnonzero(first), 500 + np.flatnonzero(later)
    index = SearchIndex.build(es(rows_a, labels[rows_a]), backend=backend, metric=metric, centroids=True)
    before = dict(zip(index.labels.tolist(), index.ids.tolist()))
    new_ids = index.add(x[rows_b], labels[rows_b], [paths[i] for i in rows_b])
    rows = np.r_[rows_a, rows_b]
    fresh = SearchIndex.build(es(rows, labels[rows]), backend=backend, metric=metric, centroids=True)
    order = np.argsort(index.labels)
    assert index.labels[order].tolist() == fresh.labels.tolist() == list(range(C))
    np.testing.assert_array_equal(index.counts[order], fresh.counts)
    np.testing.assert_allclose(index.backend.state()["vectors"][order], fresh.backend.state()["vectors"], atol=1e-5)
    assert [index.paths[i] for i in order] == list(fresh.paths)  # a label keeps its first picture
    after = dict(zip(index.labels.tolist(), index.ids.tolist()))
    assert all(after[c] == before[c] for c in (0, 1, 2)) and all(after[c] not in before.values() for c in range(3, C))
    assert sorted(after[c] for c in range(3, C)) == new_ids.tolist()
    assert [h.label for h in index.search(q, 3)[0]] == [h.label for h in fresh.search(q, 3)[0]]
    assert index.remove(labels=[4]).tolist() == [after[4]] and 4 not in index.labels.tolist()
    with pytest.raises(SearchIndexError, match="cannot remove them by path"):
        index.remove(paths=[paths[0]])


def test_index_metrics_are_the_evaluation_distances():
    from deepmetric.evaluation.neighbors import DISTANCES
    from deepmetric.inference.index import METRICS, canonical_metric

    assert set(METRICS) <= set(DISTANCES) and canonical_metric("l2") == "squared_euclidean"
    assert SearchIndex(D, "l2").metric == "squared_euclidean"


@pytest.mark.parametrize("ranking", ["torch", "numpy"])
def test_exact_search_is_topk_neighbors(data, ranking, monkeypatch):
    """The same order as the evaluation's primitive, ties included (exact duplicates tie: lower row first).
    Without PyTorch the exact backend ranks in numpy (a BLAS product rounds a vector differently at
    another column, so it recomputes the candidates' keys per pair): the same order, scores to float32
    rounding of the squared distances' cancellation (1e-4 here)."""
    from deepmetric.inference import backends

    if ranking == "numpy":
        monkeypatch.setattr(backends, "_torch_neighbors", lambda: None)
    atol = 1e-5 if ranking == "torch" else 1e-4
    x, _, _, q = data
    g = np.concatenate([x[:50], x[:50], x[10:20]])  # every vector at least twice
    for metric in ("cosine", "squared_euclidean"):
        index = SearchIndex(D, metric, "exact", query_chunk=7)
        assert (index.backend._neighbors is None) == (ranking == "numpy")
        index.add(g)
        for queries in (q, g[:15]):
            dist, rows = topk_neighbors(torch.from_numpy(queries), torch.from_numpy(g), k=12, distance=metric)
            scores, ids = index.search_arrays(queries, 12)
            np.testing.assert_array_equal(ids, rows.numpy())
            expected = 1 - dist.numpy() if metric == "cosine" else dist.numpy()
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=atol)
        assert (ids[:, 0] == np.arange(15)).all() and (ids[:, 1] == np.arange(15) + 50).all()
        assert index.search_arrays(g[:3], len(g))[1].shape == (3, len(g)), "k = N: every row"


# -- durability ------------------------------------------------------------------------------------

@pytest.fixture()
def gallery(data, tmp_path):
    x, labels, paths, _ = data
    index = SearchIndex(D, "cosine", "faiss-hnsw")
    index.add(x[:200], labels[:200], paths[:200])
    return index.save(tmp_path / "gallery.index")


def assert_unchanged(path, data):
    """``path`` is the original 200-item index, and nothing but it (and its lock) is in its folder."""
    index = SearchIndex.load(path)
    assert len(index) == 200 and index.ids.tolist() == list(range(200))
    assert index.search(data[0][7], k=1)[0][0].id == 7


@pytest.mark.parametrize("fault", ["replace", "fsync", "write"])
def test_a_fault_mid_update_leaves_the_old_index(data, gallery, monkeypatch, fault):
    real = index_file._write_safetensors

    def disk_full(f, arrays, meta):  # half the file written, then the disk fills up
        real(f, dict(list(arrays.items())[:4]), meta)
        raise OSError("No space left on device")

    def boom(*args, **kwargs):
        raise OSError(f"simulated failure in {fault}")

    if fault == "write":
        monkeypatch.setattr(index_file, "_write_safetensors", disk_full)
    else:
        monkeypatch.setattr(os, fault, boom)
    with pytest.raises(OSError):
        with edit_index(gallery) as index:
            index.remove(ids=[7])
            index.add(data[0][500:510])
    monkeypatch.undo()
    assert_unchanged(gallery, data)
    assert sorted(p.name for p in gallery.parent.iterdir()) == [".gallery.index.lock", "gallery.index"]


def test_a_killed_process_mid_write_leaves_the_old_index(data, gallery):
    """SIGKILL while the new file is half written: the old index is intact and searchable."""
    child = textwrap.dedent(f"""
        import os, sys, time
        import numpy as np
        from deepmetric.inference import index as m, index_file

        real = index_file._write_safetensors
        def slow(f, arrays, meta):
            real(f, dict(list(arrays.items())[:4]), meta)
            f.flush()
            os.fsync(f.fileno())
            print("half written", flush=True)
            time.sleep(60)
        index_file._write_safetensors = slow
        with m.edit_index({str(gallery)!r}) as index:
            index.add(np.ones((3, {D}), np.float32))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half written"
    finally:
        proc.kill()
        proc.wait()
    assert_unchanged(gallery, data)
    temps = [p for p in gallery.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the dead write, ignored


def test_concurrent_edits_do_not_lose_items(data, gallery):
    """The second edit waits for the first one's lock, so it starts from the first one's result."""
    x = data[0]
    first_loaded, results = threading.Event(), {}

    def slow_first():
        with edit_index(gallery) as index:
            first_loaded.set()
            time.sleep(0.5)
            results["first"] = index.add(x[500:502]).tolist()

    t = threading.Thread(target=slow_first)
    t.start()
    assert first_loaded.wait(30)
    with edit_index(gallery) as index:
        results["second"] = index.add(x[502:503]).tolist()
    t.join()
    final = SearchIndex.load(gallery)
    assert results == {"first": [200, 201], "second": [202]} and final.ids[-3:].tolist() == [200, 201, 202]


def test_missing_faiss_names_the_extra(data, gallery, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(FaissMissingError, match=r"needs FAISS, which is not installed: pip install 'deepmetric\[serve\]'"):
        SearchIndex(D, backend="faiss-ivf")
    with pytest.raises(FaissMissingError, match=r"gallery.index: backend faiss-hnsw needs FAISS") as e:
        SearchIndex.load(gallery)
    assert "\n" not in str(e.value)
    index = SearchIndex(D)  # the exact backend needs no FAISS
    index.add(data[0][:3])
    assert len(index.search(data[0][0], k=2)[0]) == 2


# -- issue 23: NaN, tombstones, the change log, the lock ---------------------------------------------

def test_non_finite_vectors_are_refused_by_row(data):
    index = SearchIndex(D, "cosine", "faiss-hnsw")
    x = data[0][:6].copy()
    x[4, 2] = np.nan
    with pytest.raises(SearchIndexError, match=r"row 4 \(/gallery/4.jpg\) holds NaN or infinite values"):
        index.add(x, paths=data[2][:6])
    x[4, 2], x[1, 0] = 1.0, np.inf
    with pytest.raises(SearchIndexError, match=r"row 1 holds NaN"):
        index.add(x)
    assert len(index) == 0 and index.changes == 0, "nothing was added"
    index.add(data[0][:6])
    with pytest.raises(SearchIndexError, match="query: row 0 holds NaN"):
        index.search(np.full(D, np.nan, np.float32), k=10)


def test_hnsw_search_survives_faiss_torch_utils():
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which swaps Index.search for a torch-aware
    one without ``params``; a tombstoned HNSW index must still search (the CI run that imported PML first
    failed here)."""
    code = textwrap.dedent("""
        import faiss.contrib.torch_utils
        import numpy as np
        from deepmetric.inference.index import SearchIndex
        x = np.random.RandomState(0).randn(120, 8).astype("float32")
        index = SearchIndex(8, "cosine", "faiss-hnsw")
        index.add(x, np.zeros(120, int), [str(i) for i in range(120)])
        index.remove(ids=[0, 1])
        rows = index.search_arrays(x[:2], 5)[1]
        assert not np.isin(rows, [0, 1]).any(), rows
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_hnsw_removal_is_a_tombstone_that_saves_and_compacts(data, tmp_path):
    """A removal marks the row dead (no rebuild); searches skip it; the file keeps the tombstones; a
    compaction built while the old graph serves catches up with what changed meanwhile."""
    x, labels, paths, q = data
    index = SearchIndex(D, "cosine", "faiss-hnsw")
    index.add(x[:200], labels[:200], paths[:200])
    graph = index.backend.index
    index.remove(ids=list(range(0, 40)))
    assert index.backend.index is graph and index.backend.slots == 200 and len(index) == 160
    assert not np.isin(index.search_arrays(q, 10)[1], np.arange(40)).any()
    loaded = SearchIndex.load(index.save(tmp_path / "g.index"))
    assert loaded.backend.slots == 200 and index_file.read_header(tmp_path / "g.index", ["faiss-hnsw"])["slots"] == 200
    np.testing.assert_array_equal(loaded.search_arrays(q, 10)[1], index.search_arrays(q, 10)[1])
    assert index.compaction() is None, "40 of 200 dead: below the quarter that makes a rebuild worth it"
    job = index.compaction(force=True)
    job.build()
    index.remove(ids=[50, 60])  # meanwhile: a removal and an add
    new = index.add(x[200:210], labels[200:210], paths[200:210])
    job.install()
    assert index.backend.index is not graph and index.backend.slots == 170 and len(index) == 168
    truth = SearchIndex(D, "cosine", "exact")
    truth.add(x[index.ids], labels[index.ids])
    exact = index.ids[truth.search_arrays(q, 10)[1]]
    got = index.search_arrays(q, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]) >= 0.95
    assert not np.isin(got, [50, 60]).any() and np.isin(new, index.ids).all()


def log_with_changes(data, tmp_path):
    """A saved 100-item index, then 3 logged changes (an add, a remove, an add) applied in memory only."""
    from deepmetric.inference import index_log

    x, labels, paths, _ = data
    index = SearchIndex(D, "cosine", "faiss-flat")
    index.add(x[:100], labels[:100], paths[:100])
    path = index.save(tmp_path / "g.index")
    log = index_log.ChangeLog.start(path, index.lineage)
    for change in ("add", "remove", "add"):
        if change == "add":
            batch = index.check_batch(x[index.next_id:index.next_id + 2], labels[:2], ["a.jpg", None])
            log.append_add(batch, index.changes + 1, index.next_id)
            index.add_batch(batch)
        else:
            log.append_remove([7, 8], index.changes + 1)
            index.remove(ids=[7, 8])
    log.close()
    return index, path


def test_load_replays_the_change_log(data, tmp_path):
    index, path = log_with_changes(data, tmp_path)
    loaded = SearchIndex.load(path)
    assert loaded.ids.tolist() == index.ids.tolist() and loaded.changes == index.changes == 4
    assert len(SearchIndex.load(path, log=False)) == 100
    wal = tmp_path / "g.index.wal"
    whole = wal.read_bytes()
    wal.write_bytes(whole[:-10])  # the last record cut short: it was never acknowledged
    assert SearchIndex.load(path).ids.tolist() == index.ids.tolist()[:-2]
    broken = bytearray(whole)
    broken[len(whole) // 2] ^= 0xFF  # damage before intact records: refused, naming the log
    wal.write_bytes(bytes(broken))
    with pytest.raises(index_file.IndexFileError, match="g.index.wal: the change log is damaged"):
        SearchIndex.load(path)
    wal.write_bytes(whole)
    rebuilt = SearchIndex(D, "cosine", "faiss-flat")
    rebuilt.add(data[0][:3])
    rebuilt.save(path)  # another index at that path: its log is not this one's
    assert len(SearchIndex.load(path)) == 3


def test_edit_index_replays_the_log_into_the_file(data, tmp_path):
    index, path = log_with_changes(data, tmp_path)
    with edit_index(path) as edited:
        assert edited.ids.tolist() == index.ids.tolist()
        edited.remove(ids=[0])
    assert not (tmp_path / "g.index.wal").exists()
    assert SearchIndex.load(path, log=False).ids.tolist() == index.ids.tolist()[1:]


def test_an_edit_refuses_an_index_a_server_holds(data, gallery):
    from deepmetric.inference import index_lock

    held = index_lock.serving(gallery)
    try:
        with pytest.raises(index_lock.IndexLockedError, match=f"PID {os.getpid()}.*stop the server first"):
            with edit_index(gallery):
                pass
        with pytest.raises(index_lock.IndexLockedError, match="already served by another"):
            index_lock.serving(gallery)
    finally:
        held.release()
    with edit_index(gallery) as index:
        index.remove(ids=[3])
    assert len(SearchIndex.load(gallery)) == 199
