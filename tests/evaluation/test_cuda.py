"""The same results on CUDA as on CPU (skipped without a GPU)."""
import warnings

import numpy as np
import pytest
import torch

from deepmetric.evaluation import (centroid_gallery, k_reciprocal_rerank, pairwise_distances, reid_metrics_centroids,
                                   reid_metrics_from_embeddings, retrieval_metrics, topk_neighbors)
from deepmetric.core.embeddings import EmbeddingSet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def data(seed=0, n=300, d=16, classes=30):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d))[y] + 0.8 * rng.standard_normal((n, d))
    return torch.from_numpy(x), y, rng.integers(0, 4, n)


def test_retrieval_and_topk_cuda_equal_cpu():
    x, y, _ = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = retrieval_metrics(x, y, ks=(1, 5), chunk_size=64)
        gpu = retrieval_metrics(x.cuda(), y, ks=(1, 5), chunk_size=64)
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], abs=1e-12), k
    dc, ic = topk_neighbors(x, k=5)
    dg, ig = topk_neighbors(x.cuda(), k=5)
    assert torch.equal(ic, ig.cpu()) and torch.allclose(dc, dg.cpu())


def test_reid_rerank_centroids_cuda_equal_cpu():
    x, y, cam = data(1)
    q, g = EmbeddingSet(x[:60], y[:60], camids=cam[:60]), EmbeddingSet(x[60:], y[60:], camids=cam[60:])
    qc, gc = EmbeddingSet(x[:60].cuda(), y[:60], camids=cam[:60]), EmbeddingSet(x[60:].cuda(), y[60:], camids=cam[60:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rerank in (False, True):
            a = reid_metrics_from_embeddings(q, g, rerank=rerank)
            b = reid_metrics_from_embeddings(qc, gc, rerank=rerank)
            np.testing.assert_allclose(a["cmc"], b["cmc"]) and np.testing.assert_allclose(a["map"], b["map"], atol=1e-9)
        a = reid_metrics_centroids(q, centroid_gallery(g, q.camids, camera_aware=True))
        b = reid_metrics_centroids(qc, centroid_gallery(gc, q.camids, camera_aware=True))
        assert a["map"] == pytest.approx(b["map"], abs=1e-9)
    q, g = x[:60], x[60:]
    mats = [pairwise_distances(a, b, "squared_euclidean").float() for a, b in ((q, g), (q, q), (g, g))]
    np.testing.assert_allclose(k_reciprocal_rerank(*mats), k_reciprocal_rerank(*(m.cuda() for m in mats)), atol=1e-5)
