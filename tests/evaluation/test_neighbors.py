"""Chunked exact neighbours: top-k and member ranks against full stable sorts; distances against torch.cdist."""
import numpy as np
import pytest
import torch

import deepmetric.evaluation.neighbors as nb
from deepmetric.evaluation import pairwise_distances, topk_neighbors


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_pairwise_distances(distance):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((17, 5)), rng.standard_normal((23, 5))
    d = pairwise_distances(a, b, distance, chunk_size=4).numpy()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if distance == "cosine":
        ref = 1 - torch.nn.functional.normalize(ta, dim=1) @ torch.nn.functional.normalize(tb, dim=1).T
    else:
        ref = torch.cdist(ta, tb) ** (2 if distance == "squared_euclidean" else 1)
    np.testing.assert_allclose(d, ref.numpy(), atol=1e-10)


@pytest.mark.parametrize("loo", [False, True])
def test_topk_stable_ties(loo):
    rng = np.random.default_rng(1)
    q = rng.integers(-1, 2, (30, 2)).astype(np.float32)
    g = None if loo else rng.integers(-1, 2, (50, 2)).astype(np.float32)
    ref_g = q if loo else g
    d = ((q[:, None] - ref_g[None]) ** 2).sum(-1)
    if loo:
        np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :7]
    dist, idx = topk_neighbors(q, g, k=7, distance="squared_euclidean", chunk_size=4)
    np.testing.assert_array_equal(idx.numpy(), order)
    np.testing.assert_allclose(dist.numpy(), np.take_along_axis(d, order, 1))
    assert topk_neighbors(q[:3], k=100)[1].shape == (3, 2)  # k capped at the other items
    with pytest.raises(ValueError):
        topk_neighbors(q[:1], k=1)


def test_stable_topk_fast_and_exact_paths():
    torch.manual_seed(0)
    for _ in range(50):
        c, n = torch.randint(1, 9, (2,)).tolist()
        n += 1
        k = int(torch.randint(1, n + 1, (1,)))
        x = torch.randint(0, 4, (c, n)).float()
        v, i = nb.stable_topk(x, k)
        ref = torch.sort(x, dim=1, stable=True)
        assert torch.equal(i, ref.indices[:, :k]) and torch.equal(v, ref.values[:, :k])


@pytest.mark.parametrize("force_sort", [False, True])
def test_member_ranks_against_sort(force_sort, monkeypatch):
    if force_sort:
        monkeypatch.setattr(nb, "_CANDIDATE_BUDGET", 1)
    rng = np.random.default_rng(2)
    c, n, r = 6, 150, 9
    keys = torch.full((c, nb.padded_width(n)), float("inf"))
    keys[:, :n] = torch.from_numpy(rng.integers(0, 20, (c, n)).astype(np.float32))  # many ties
    members = torch.from_numpy(np.stack([np.sort(rng.choice(n, r, replace=False)) for _ in range(c)]))
    valid = torch.from_numpy(rng.random((c, r)) < 0.9)
    members = torch.where(valid, members, torch.full_like(members, -1))
    ignored = valid & torch.from_numpy(rng.random((c, r)) < 0.3)
    relevant = valid & ~ignored
    ranks = nb.member_ranks(keys, members, valid, relevant, n)
    for row in range(c):
        order = torch.sort(keys[row, :n], stable=True).indices.tolist()
        drop = set(members[row][ignored[row]].tolist())
        kept = [g for g in order if g not in drop]
        for j in range(r):
            expected = kept.index(int(members[row, j])) if relevant[row, j] else -1
            assert int(ranks[row, j]) == expected
