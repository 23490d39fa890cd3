"""Centroid galleries: the means, and re-ID metrics against a per-query brute force of the documented protocol."""
import warnings

import numpy as np
import pytest
import torch

from deepmetric.evaluation import CentroidGallery, centroid_gallery, reid_metrics_centroids
from deepmetric.core.embeddings import EmbeddingSet


def sets(seed, n_q=40, n_g=160, pids=15, cams=4):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((pids, 8))
    qp, gp = rng.integers(0, pids, n_q), rng.integers(0, pids, n_g)
    qx, gx = centres[qp] + rng.standard_normal((n_q, 8)), centres[gp] + rng.standard_normal((n_g, 8))
    q = EmbeddingSet(torch.from_numpy(qx), qp, camids=rng.integers(0, cams, n_q))
    g = EmbeddingSet(torch.from_numpy(gx), gp, camids=rng.integers(0, cams, n_g))
    return q, g


def brute_force(q, g, camera_aware, max_rank=10):
    """Per query: one centroid per pid; its own pid's from cameras other than the query's (camera-aware)."""
    gx, qx = g.vectors.numpy(), q.vectors.numpy()
    pids = np.unique(g.labels)
    firsts, aps = [], []
    for i in range(len(q)):
        cents, own = [], None
        for j, p in enumerate(pids):
            sel = g.labels == p
            if p == q.labels[i]:
                own = j
                if camera_aware:
                    sel &= g.camids != q.camids[i]
            cents.append(gx[sel].mean(0) if sel.any() else None)
        if own is None or cents[own] is None:
            continue
        keep = [j for j in range(len(pids)) if cents[j] is not None]
        d = np.array([((qx[i] - cents[j]) ** 2).sum() for j in keep])
        r = int(np.nonzero(np.array(keep)[np.argsort(d, kind="stable")] == own)[0][0])
        firsts.append(r)
        aps.append(1 / (r + 1))
    firsts = np.array(firsts)
    return [np.mean(firsts < k) for k in range(1, max_rank + 1)], np.mean(aps), len(q) - len(firsts)


@pytest.mark.parametrize("camera_aware", [False, True])
def test_against_brute_force(camera_aware):
    q, g = sets(0)
    cg = centroid_gallery(g, query_camids=q.camids, camera_aware=camera_aware)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = reid_metrics_centroids(q, cg, distance="squared_euclidean", max_rank=10, chunk_size=7)
    cmc, mAP, skipped = brute_force(q, g, camera_aware)
    np.testing.assert_allclose(m["cmc"], cmc, atol=1e-12)
    assert m["map"] == pytest.approx(mAP, abs=1e-12) and m["skipped_queries"] == skipped
    assert m["minp"] == pytest.approx(mAP, abs=1e-12)  # one relevant centroid: INP = AP = 1/(rank+1)


def test_centroid_vectors_and_layout():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [6.0, 6.0], [10.0, 10.0]])
    g = EmbeddingSet(x, [3, 3, 3, 1, 1], camids=[0, 1, 1, 2, 2])
    cg = centroid_gallery(g, query_camids=[1, 2, 7], camera_aware=True)
    assert isinstance(cg, CentroidGallery) and cg.num_pids == 2
    assert cg.labels.tolist() == [1, 3, 3] and cg.excluded_camids.tolist() == [-1, -1, 1]
    assert cg.counts.tolist() == [2, 3, 1] and cg.sole_camids.tolist() == [2, -1, -1]
    np.testing.assert_allclose(cg.vectors.numpy(), [[8, 8], [2 / 3, 4 / 3], [0, 0]])
    assert cg.full().labels.tolist() == [1, 3] and len(cg.full()) == 2
    plain = centroid_gallery(g)
    assert plain.query_cameras is None and len(plain) == 2


def test_pid_seen_only_in_query_camera_is_skipped_and_errors():
    g = EmbeddingSet(torch.tensor([[0.0], [1.0], [5.0]]), [1, 2, 2], camids=[0, 0, 1])
    q = EmbeddingSet(torch.tensor([[0.1], [0.9], [4.0]]), [1, 2, 3], camids=[0, 0, 1])
    cg = centroid_gallery(g, query_camids=q.camids, camera_aware=True)
    with pytest.warns(UserWarning, match="2 of 3"):
        m = reid_metrics_centroids(q, cg, max_rank=2)
    assert m["skipped_queries"] == 2  # pid 1 only in camera 0; pid 3 not in the gallery
    assert m["rank1"] == 0.0  # pid 2 from camera 0 sees the camera-1 image (5.0) only: centroid 1 (pid 1) is closer
    with pytest.raises(ValueError, match="not given"):
        reid_metrics_centroids(EmbeddingSet(q.vectors, q.labels, camids=[0, 0, 9]), cg)
    with pytest.raises(ValueError, match="camids"):
        centroid_gallery(EmbeddingSet(g.vectors, g.labels), query_camids=[0], camera_aware=True)
    with pytest.raises(ValueError, match="empty"):
        centroid_gallery(EmbeddingSet(torch.zeros(0, 1), []))
