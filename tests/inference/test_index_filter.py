"""``SearchIndex.search(..., filter=...)`` on an index file's backends: exact backends give exact search over
the items the filter passes (compared with a mask over a naive score matrix), per query or for all."""
from __future__ import annotations

import numpy as np
import pytest

from deepmetric.inference.filters import ItemFilter
from deepmetric.inference.index import SearchIndex, SearchIndexError

D, N = 8, 60


@pytest.fixture(scope="module")
def gallery():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.arange(N) % 6
    return x, labels, [f"/g/{i}.jpg" for i in range(N)]


def naive(x, q, k, keep):
    scores = q @ x.T
    scores[~keep] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[int(j) for j in row if keep[i, j]] for i, row in enumerate(order)]


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
def test_filters_equal_a_mask(gallery, backend):
    x, labels, paths = gallery
    index = SearchIndex(D, backend=backend, class_names=[f"c{i}" for i in range(6)])
    index.add(x, labels, paths)
    q = x[:5] + 0.05
    per_query = [ItemFilter(exclude=[{"label": int(labels[i])}]) for i in range(5)]
    keep = labels[None, :] != labels[:5, None]
    got = index.search(q, k=7, filter=per_query)
    assert [[h.id for h in hits] for hits in got] == naive(x, q, 7, keep)
    few = ItemFilter(only={"label_name": ["c2"], "path": [paths[2], paths[8], paths[9]]})
    got = index.search(q, k=5, filter=few)  # fewer pass than k: the hits stop there
    assert [[h.id for h in hits] for hits in got] == naive(x, q, 5, np.broadcast_to(np.isin(np.arange(N), [2, 8]), (5, N)))
    scores, ids = index.search_arrays(q, k=5, filter=few)
    assert (ids[:, 2:] == -1).all() and np.isnan(scores[:, 2:]).all()
    unfiltered = index.search(q, k=4)
    assert index.search(q, k=4, filter=[None] * 5) == unfiltered


def test_filters_are_checked(gallery):
    x, labels, paths = gallery
    index = SearchIndex.build(type("E", (), {"dim": D, "vectors": x, "labels": labels, "paths": paths})())
    with pytest.raises(SearchIndexError, match="no field 'colour'"):
        ItemFilter(only={"colour": [1]})
    with pytest.raises(SearchIndexError, match="takes int"):
        ItemFilter(only={"label": ["3"]})
    with pytest.raises(SearchIndexError, match="2 filters for 3 queries"):
        index.search(x[:3], k=2, filter=[None, None])
    with pytest.raises(SearchIndexError, match="for a Milvus index"):
        index.search(x[:1], k=2, filter="label == 3")
    with pytest.raises(SearchIndexError, match="camera"):
        index.search(x[:1], k=2, filter=ItemFilter(only={"camera": 1}))
    assert ItemFilter(only={"label": [1, 2], "path": 'a"b'}, exclude=[{"camera": 0}]).expression() == \
        'label in [1, 2] and path == "a\\"b" and camera != 0'
