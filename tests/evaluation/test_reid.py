"""reid_metrics against a brute-force loop with the pinned tie rule; the embedding and re-ranking entry points."""
import warnings

import numpy as np
import pytest
import torch

from deepmetric.evaluation import k_reciprocal_rerank, pairwise_distances, reid_metrics, reid_metrics_from_embeddings
from deepmetric.core.embeddings import EmbeddingSet


def naive_reid(dist, qp, gp, qc, gc, max_rank):
    cmcs, aps, inps = [], [], []
    for i in range(len(dist)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((gp[order] == qp[i]) & (gc[order] == qc[i])) if qc is not None else np.ones(len(order), bool)
        hits = gp[order][keep] == qp[i]
        if not hits.any():
            continue
        pos = np.nonzero(hits)[0]
        cmcs.append([pos[0] < k for k in range(1, max_rank + 1)])
        aps.append(np.mean(np.arange(1, len(pos) + 1) / (pos + 1)))
        inps.append(len(pos) / (pos[-1] + 1))
    return np.mean(cmcs, 0), np.mean(aps), np.mean(inps), len(dist) - len(aps)


def data(seed, n_q=40, n_g=120, pids=25, cams=4, ties=False):
    rng = np.random.default_rng(seed)
    dist = rng.integers(0, 6, (n_q, n_g)).astype(np.float64) if ties else rng.random((n_q, n_g))
    pid_q, pid_g = rng.integers(0, pids, n_q), rng.integers(0, pids, n_g)
    return dist, pid_q, pid_g, rng.integers(0, cams, n_q), rng.integers(0, cams, n_g)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk", [None, 3])
def test_against_brute_force(ties, chunk):
    dist, qp, gp, qc, gc = data(1, ties=ties)
    cmc, mAP, mINP, skipped = naive_reid(dist, qp, gp, qc, gc, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = reid_metrics(dist, qp, gp, qc, gc, max_rank=50, chunk_size=chunk)
        mt = reid_metrics(torch.from_numpy(dist).float(), torch.from_numpy(qp), gp, qc, gc, max_rank=50)
    np.testing.assert_allclose(m["cmc"], cmc, atol=1e-12)
    assert (m["map"], m["minp"], m["skipped_queries"]) == pytest.approx((mAP, mINP, skipped), abs=1e-12)
    assert m["rank1"] == m["cmc"][0] and m["rank5"] == m["cmc"][4] and m["rank10"] == m["cmc"][9]
    assert mt["map"] == pytest.approx(m["map"], abs=1e-12) and m["num_queries"] == 40


def test_same_camera_same_pid_removed_other_camera_kept():
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    # gallery 0: same pid same camera (junk, removed); 1: other pid same camera (negative); 2: same pid other camera
    m = reid_metrics(dist, [5], [5, 6, 5, 7], [0], [0, 0, 1, 1], max_rank=4)
    assert m["cmc"] == [0.0, 1.0, 1.0, 1.0]  # max_rank is capped at G, not at the (shorter) filtered list
    assert m["map"] == pytest.approx(0.5) and m["minp"] == pytest.approx(0.5)


def test_no_cameras_and_skips_and_errors():
    dist = np.array([[0.3, 0.1], [0.2, 0.4]])
    m = reid_metrics(dist, [1, 2], [1, 2], None, None, max_rank=5)
    assert m["cmc"] == [0.0, 1.0] and m["rank1"] == 0.0 and m["rank5"] == 1.0
    with pytest.warns(UserWarning, match="1 of 2"):
        m = reid_metrics(dist, [1, 3], [1, 2], [0, 0], [1, 1])
    assert m["skipped_queries"] == 1 and m["rank1"] == 0.0
    with pytest.warns(UserWarning):
        m = reid_metrics(dist, [1, 2], [1, 2], [0, 0], [0, 0])  # every match is same-camera
    assert np.isnan(m["map"]) and m["skipped_queries"] == 2
    with pytest.raises(ValueError, match="empty"):
        reid_metrics(np.zeros((2, 0)), [1, 2], [], [0, 0], [])
    with pytest.raises(ValueError, match="NaN"):
        reid_metrics(np.full((1, 2), np.nan), [1], [1, 2], [0], [1, 1])
    with pytest.raises(ValueError, match="both"):
        reid_metrics(dist, [1, 2], [1, 2], [0, 0], None)


def same_metrics(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=0, err_msg=k)


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_from_embeddings_equals_matrix_path(distance):
    rng = np.random.default_rng(2)
    pid = rng.integers(0, 12, 150)
    x = torch.from_numpy((rng.standard_normal((12, 16))[pid] + 0.9 * rng.standard_normal((150, 16))).astype(np.float32))
    cam = rng.integers(0, 3, 150)
    q, g = EmbeddingSet(x[:30], pid[:30], camids=cam[:30]), EmbeddingSet(x[30:], pid[30:], camids=cam[30:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = reid_metrics_from_embeddings(q, g, distance=distance, max_rank=20, chunk_size=7)
        ref = reid_metrics(pairwise_distances(q.vectors, g.vectors, distance), q.labels, g.labels,
                           q.camids, g.camids, 20)
        rr = reid_metrics_from_embeddings(q, g, distance=distance, max_rank=20, rerank=True, k1=10, k2=3)
        qv, gv = q.vectors, g.vectors
        dd = [pairwise_distances(a, b, distance) for a, b in ((qv, gv), (qv, qv), (gv, gv))]
        rr_ref = reid_metrics(k_reciprocal_rerank(*dd, k1=10, k2=3), q.labels, g.labels, q.camids, g.camids, 20)
    same_metrics(ours, ref, 1e-9)
    same_metrics(rr, rr_ref, 1e-12)
    with pytest.raises(ValueError, match="rerank=False"):
        reid_metrics_from_embeddings(q, g, k1=5)
