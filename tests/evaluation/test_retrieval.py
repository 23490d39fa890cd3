"""retrieval_metrics against a brute-force loop (stable argsort of exact distances), edge cases, tie rule."""
import warnings

import numpy as np
import pytest
import torch

import deepmetric.evaluation.neighbors as nb
from deepmetric.evaluation import rank_statistics, retrieval_metrics


def naive(q, qy, g=None, gy=None, ks=(1, 2, 5)):
    """Leave-one-out when g is None. Squared-L2 in float64, stable argsort (the pinned tie rule)."""
    loo = g is None
    g, gy = (q, qy) if loo else (g, gy)
    d = ((q.astype(np.float64)[:, None] - g.astype(np.float64)[None]) ** 2).sum(-1)
    per = {"ap": [], "map@r": [], "r_precision": [], "first": []}
    for i in range(len(q)):
        order = np.argsort(d[i], kind="stable")
        if loo:
            order = order[order != i]  # the query itself, by index
        rel = gy[order] == qy[i]
        R = int(rel.sum())
        if R == 0:
            continue
        pos = np.nonzero(rel)[0]
        prec = np.arange(1, R + 1) / (pos + 1)
        per["ap"].append(prec.mean())
        per["map@r"].append(prec[pos < R].sum() / R)
        per["r_precision"].append((pos < R).sum() / R)
        per["first"].append(pos[0])
    first = np.array(per["first"])
    out = {f"recall@{k}": np.mean(first < k) for k in ks}
    out.update({k: np.mean(per[k]) for k in ("ap", "map@r", "r_precision")})
    out["map"] = out.pop("ap")
    out["skipped_queries"] = len(q) - len(first)
    return out


def check(ours, ref):
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k


def grid_data(n, d, classes, seed):
    """Small-integer vectors: many exact ties and duplicates, computed exactly in float32."""
    rng = np.random.default_rng(seed)
    return rng.integers(-2, 3, (n, d)).astype(np.float32), rng.integers(0, classes, n)


@pytest.mark.parametrize("seed,dtype", [(0, np.float32), (1, np.float32), (2, np.float64)])
def test_leave_one_out_with_ties_matches_stable_argsort(seed, dtype):
    x, y = grid_data(120, 3, 8, seed)
    x = x.astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(retrieval_metrics(x, y, ks=(1, 2, 5), distance="squared_euclidean"), naive(x, y))


def test_query_gallery_with_ties_and_small_chunks():
    x, y = grid_data(150, 3, 6, 3)
    ref = naive(x[:40], y[:40], x[40:], y[40:])
    for chunk in (1, 7, None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(retrieval_metrics(x[:40], y[:40], x[40:], y[40:], ks=(1, 2, 5), distance="euclidean",
                                    chunk_size=chunk), ref)


def test_sort_fallback_path_agrees(monkeypatch):
    x, y = grid_data(100, 3, 5, 4)
    fast = retrieval_metrics(x, y, ks=(1, 2, 5), distance="euclidean", return_per_query=True)
    monkeypatch.setattr(nb, "_CANDIDATE_BUDGET", 1)  # force the row-by-row path
    slow = retrieval_metrics(x, y, ks=(1, 2, 5), distance="euclidean", return_per_query=True)
    for k in ("ap", "map@r", "r_precision", "first"):
        np.testing.assert_array_equal(fast["per_query"][k], slow["per_query"][k])


def test_duplicate_of_query_counts_self_excluded_by_index():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0], [9.0, 0.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 2, 3])
    with pytest.warns(UserWarning, match="3 of 5 queries"):
        m = retrieval_metrics(x, y, ks=(1,), distance="euclidean")
    # queries 0 and 1 find each other at distance 0 (the duplicate counts); 2, 3 and 4 have no relevant item
    assert m["recall@1"] == 1.0 and m["map"] == 1.0
    assert m["skipped_queries"] == 3 and m["num_queries"] == 5


def test_tie_rule_lower_gallery_index_first():
    q = np.zeros((1, 1), dtype=np.float32)
    g = np.array([[1.0], [-1.0], [1.0]], dtype=np.float32)  # all at distance 1
    m = retrieval_metrics(q, [7], g, [3, 7, 7], ks=(1,), distance="euclidean", return_per_query=True)
    assert m["per_query"]["first"].tolist() == [1]  # gallery 0 comes first, then 1 (relevant), then 2
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_signed_zero_keys_tie():
    # cosine keys −⟨q, g⟩ of orthogonal vectors come out as −0.0 or +0.0: equal, so ordered by index
    q = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    g = np.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], dtype=np.float32)
    for labels, first in (([1, 1, 1, 7], 3), ([7, 1, 1, 1], 0), ([1, 7, 1, 1], 1)):
        m = retrieval_metrics(q, [7], g, labels, ks=(1,), distance="cosine", return_per_query=True)
        assert m["per_query"]["first"].tolist() == [first]


def test_singletons_no_match_all_skipped():
    x = np.eye(4, dtype=np.float32)
    with pytest.warns(UserWarning):
        m = retrieval_metrics(x, [0, 1, 2, 3])
    assert m["skipped_queries"] == 4 and np.isnan(m["map"]) and np.isnan(m["recall@1"])
    with pytest.warns(UserWarning, match="1 of 2"):
        m = retrieval_metrics(x[:2], [0, 9], x, [0, 0, 1, 1], ks=(1,))
    assert m["recall@1"] == 1.0 and m["skipped_queries"] == 1


def test_errors():
    x = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="gallery is empty"):
        retrieval_metrics(x, [0, 0, 1], np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="gallery is empty"):
        retrieval_metrics(x[:1], [0])
    with pytest.raises(ValueError, match="query set is empty"):
        retrieval_metrics(np.zeros((0, 2)), [], x, [0, 0, 1])
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(x, [0, 0, 1], np.ones((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(x, [0, 1])
    with pytest.raises(ValueError, match="distance"):
        retrieval_metrics(x, [0, 0, 1], distance="manhattan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((3, 2), np.nan), [0, 0, 1])
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(x, [0, 0, 1], x)


def test_large_and_string_labels_compare_exactly():
    x, y = grid_data(60, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = retrieval_metrics(x, y, ks=(1, 3))
        big = retrieval_metrics(x, y * 3 + (1 << 40), ks=(1, 3))
        names = retrieval_metrics(x, np.array(["cls%d" % v for v in y]), ks=(1, 3))
    assert ref == big == names


def test_cosine_torch_float64_and_ks_beyond_gallery():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 6, 80)
    x = rng.standard_normal((6, 8))[y] + 0.7 * rng.standard_normal((80, 8))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = naive(xn, y, ks=(1, 5, 500))  # on the unit sphere, squared L2 = 2 − 2 cos: same ranking
    check(retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), ks=(1, 5, 500)), ref)
    m = retrieval_metrics(x.astype(np.float32), y, ks=(500,))
    assert m["recall@500"] == 1.0


def test_nmi_is_seeded_and_perfect_on_separated_clusters():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(5), 20)
    x = 50 * np.eye(5)[y] + 0.1 * rng.standard_normal((100, 5))
    a = retrieval_metrics(x, y, ks=(1,), distance="euclidean", nmi=True, nmi_seed=3)
    b = retrieval_metrics(x, y, ks=(1,), distance="euclidean", nmi=True, nmi_seed=3)
    assert a["nmi"] == b["nmi"] and 0.0 <= a["nmi"] <= 1.0
    noisy = retrieval_metrics(rng.standard_normal((100, 5)), y, ks=(1,), nmi=True)
    assert noisy["nmi"] < a["nmi"]


def test_rank_statistics_formulas():
    ranks = torch.tensor([[0, 2, -1], [3, 1, 4], [-1, -1, -1]])
    rel = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    s = rank_statistics(ranks, rel)
    assert s["num_relevant"].tolist() == [2, 3, 0]
    assert s["first"].tolist() == [0, 1, -1]
    assert s["ap"][0].item() == pytest.approx((1 + 2 / 3) / 2)
    assert s["ap"][1].item() == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    assert s["map@r"][1].item() == pytest.approx((1 / 2) / 3)
    assert s["r_precision"][1].item() == pytest.approx(1 / 3)
    assert s["inp"][1].item() == pytest.approx(3 / 5)
    assert torch.isnan(s["ap"][2])
