"""SearchIndex: exact search against brute force, every backend's save/load round trip, centroid mode,
and the file checks (foreign, truncated, corrupt)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric.inference import EmbeddingSet
from deepmetric.inference.index import (BACKENDS, IndexFileError, SearchIndex, SearchIndexError,
                                        label_centroids)

N, D, C = 600, 16, 12


@pytest.fixture(scope="module")
def data():
    """Clustered vectors (C classes) with labels and paths, and queries near the clusters."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((C, D)).astype(np.float32) * 3
    labels = rng.integers(0, C, N)
    x = centres[labels] + rng.standard_normal((N, D)).astype(np.float32)
    q = centres[rng.integers(0, C, 25)] + rng.standard_normal((25, D)).astype(np.float32)
    return x, labels, [f"/gallery/{i}.jpg" for i in range(N)], q


def brute_force(x, q, k, metric):
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        s = qn.astype(np.float64) @ xn.T.astype(np.float64)
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
        ids = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
def test_exact_search_equals_brute_force(data, metric):
    x, labels, paths, q = data
    # small chunks, so the running top-k merge across query and gallery chunks is exercised
    index = SearchIndex(D, metric, "exact", query_chunk=7)
    index.add(x[:250], labels[:250], paths[:250])
    index.add(x[250:], labels[250:], paths[250:])
    scores, ids = index.search_arrays(q, k=10)
    ref_s, ref_ids = brute_force(x, q, 10, metric)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
    hits = index.search(q, k=10)
    assert [h.id for h in hits[3]] == ref_ids[3].tolist()
    assert all(h.label == labels[h.id] and h.path == paths[h.id] for row in hits for h in row)


def test_faiss_flat_equals_exact(data):
    x, labels, paths, q = data
    exact = SearchIndex(D, "cosine", "exact")
    flat = SearchIndex(D, "cosine", "faiss-flat")
    for idx in (exact, flat):
        idx.add(x, labels, paths)
    np.testing.assert_array_equal(exact.search_arrays(q, 10)[1], flat.search_arrays(q, 10)[1])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
def test_round_trip_every_backend(data, tmp_path, backend, metric):
    x, labels, paths, q = data
    es = EmbeddingSet(torch.from_numpy(x), labels, paths=paths)
    index = SearchIndex.build(es, backend=backend, metric=metric, class_names=[f"c{i}" for i in range(C)])
    before = index.search(q, k=10)
    path = index.save(tmp_path / "g.index")
    loaded = SearchIndex.load(path)
    assert loaded.info() == index.info() and len(loaded) == N
    after = loaded.search(q, k=10)
    assert [[(h.id, h.label, h.path, h.label_name) for h in row] for row in after] == \
           [[(h.id, h.label, h.path, h.label_name) for h in row] for row in before]
    np.testing.assert_allclose([[h.score for h in r] for r in after], [[h.score for h in r] for r in before],
                               rtol=1e-6, atol=1e-6)
    assert after[0][0].label_name == f"c{after[0][0].label}"
    if backend in ("faiss-ivf", "faiss-hnsw"):  # approximate but good on clustered data
        ref = brute_force(x, q, 10, metric)[1]
        got = loaded.search_arrays(q, 10)[1]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ref)])
        assert recall >= 0.9


def test_centroid_mode(data, tmp_path):
    x, labels, paths, q = data
    labels = labels.copy()
    labels[:5] = -1  # unlabelled items get no centroid
    es = EmbeddingSet(torch.from_numpy(x), labels, paths=paths)
    index = SearchIndex.build(es, backend="exact", metric="cosine", centroids=True)
    assert index.mode == "centroids" and len(index) == C
    assert index.source["unlabelled_skipped"] == 5
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c in (0, 7):
        members = (labels == c)
        mean = xn[members].mean(0)
        cid = int(np.flatnonzero(index.labels == c)[0])
        np.testing.assert_allclose(index.backend.state()["vectors"][cid], mean / np.linalg.norm(mean), atol=1e-5)
        assert index.counts[cid] == members.sum()
        assert index.paths[cid] == paths[int(np.flatnonzero(members)[0])]
    hits = index.search(q, k=3)
    assert all(h.label >= 0 for row in hits for h in row)
    loaded = SearchIndex.load(index.save(tmp_path / "centroids.index"))
    assert loaded.mode == "centroids"
    np.testing.assert_array_equal(loaded.counts, index.counts)
    assert [[h.id for h in r] for r in loaded.search(q, 3)] == [[h.id for h in r] for r in hits]


def test_centroids_l2_are_plain_means():
    x = np.array([[0.0, 2.0], [0.0, 4.0], [1.0, 1.0]], np.float32)
    cent, labels, _, counts = label_centroids(x, [5, 5, 9], metric="squared_euclidean")
    np.testing.assert_allclose(cent, [[0.0, 3.0], [1.0, 1.0]])
    assert labels.tolist() == [5, 9] and counts.tolist() == [2, 1]


def test_centroids_need_labels():
    with pytest.raises(SearchIndexError, match="needs labels"):
        label_centroids(np.ones((3, 2), np.float32), [-1, -1, -1])


@pytest.fixture()
def saved(data, tmp_path):
    x, labels, paths, _ = data
    index = SearchIndex(D, "cosine", "faiss-flat")
    index.add(x, labels, paths)
    return index.save(tmp_path / "gallery.index")


def test_truncated_file_names_the_file(saved):
    blob = saved.read_bytes()
    saved.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(IndexFileError, match="truncated") as e:
        SearchIndex.load(saved)
    assert str(saved) in str(e.value)
    saved.write_bytes(blob[:30])  # cut inside the header
    with pytest.raises(IndexFileError, match=str(saved)):
        SearchIndex.load(saved)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 an npz file", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_foreign_file_names_the_file(tmp_path, content):
    path = tmp_path / "foreign.index"
    path.write_bytes(content)
    with pytest.raises(IndexFileError, match="not a deepmetric index") as e:
        SearchIndex.load(path)
    assert str(path) in str(e.value)


def test_corrupt_section_fails_checksum(saved):
    blob = bytearray(saved.read_bytes())
    blob[-10] ^= 0xFF
    saved.write_bytes(bytes(blob))
    with pytest.raises(IndexFileError, match="checksum"):
        SearchIndex.load(saved)


def test_missing_file(tmp_path):
    with pytest.raises(IndexFileError, match="not found"):
        SearchIndex.load(tmp_path / "nope.index")


def test_save_is_atomic_and_leaves_no_temp_files(saved):
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_bad_arguments(data):
    x, labels, paths, q = data
    with pytest.raises(SearchIndexError, match="unknown index backend 'annoy'"):
        SearchIndex(D, backend="annoy")
    with pytest.raises(SearchIndexError, match="unknown metric"):
        SearchIndex(D, metric="dot")
    with pytest.raises(SearchIndexError, match="unknown parameter"):
        SearchIndex(D, backend="faiss-hnsw", nprobe=3)
    index = SearchIndex(D)
    with pytest.raises(SearchIndexError, match=r"expected shape \(N, 16\)"):
        index.add(np.ones((2, 5)))
    index.add(x[:3], labels[:3])
    hits = index.search(q[0], k=10)[0]  # k above the index size: every item once
    assert sorted(h.id for h in hits) == [0, 1, 2] and hits[0].path is None


def test_search_params_change_ivf_probes(data):
    x, labels, paths, q = data
    index = SearchIndex(D, "squared_euclidean", "faiss-ivf", nlist=8, nprobe=1)
    index.add(x, labels, paths)
    index.set_search_params(nprobe=8)  # all lists probed: exact
    np.testing.assert_array_equal(index.search_arrays(q, 5)[1], brute_force(x, q, 5, "squared_euclidean")[1])


def test_search_params_are_checked(data):
    x, labels, paths, q = data
    hnsw = SearchIndex(D, "cosine", "faiss-hnsw")
    hnsw.add(x)
    with pytest.raises(SearchIndexError, match=r"\['nprobe'\] cannot change at search time"):
        hnsw.set_search_params(nprobe=4)
    with pytest.raises(SearchIndexError, match="backend exact: no search parameter"):
        SearchIndex(D).set_search_params(ef_search=4)


def test_ivfpq_refine_recovers_recall(data, tmp_path):
    x, labels, paths, q = data
    truth = brute_force(x, q, 10, "cosine")[1]
    index = SearchIndex(D, "cosine", "faiss-ivfpq", nlist=4, nprobe=4, refine=10)
    index.add(x)
    loaded = SearchIndex.load(index.save(tmp_path / "pq.index"))
    for idx in (index, loaded):
        ids = idx.search_arrays(q, 10)[1]
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]) >= 0.95


def test_docstring_examples_run():
    import doctest

    from deepmetric.inference import index as index_module

    result = doctest.testmod(index_module, raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0
