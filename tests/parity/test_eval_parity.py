"""deepmetric.evaluation against the peers it replaces, on the same inputs.

- PML 2.9.0 ``AccuracyCalculator`` (faiss kNN, k=None): P@1, MAP@R, R-precision, full MAP, leave-one-out and
  query/gallery; and its float cast of labels (>= 2**24 collide), where we must differ.
- torchreid 0.2.5 ``evaluate_rank`` (Python path) for CMC / mAP; ``re_ranking`` to 1e-5.
- scikit-learn ``average_precision_score`` per query; the LFW 10-fold protocol re-implemented here with loops
  from its description (insightface's ``arcface_torch/eval/verification.py``: contiguous folds,
  thresholds 0-4 by 0.01, ``dist < t`` predicts same, the first best threshold on nine folds scored on
  the tenth, mean and population std of the ten accuracies; VAL@FAR=1e-3 at the threshold interpolated
  on the nine folds' FAR curve, first threshold per FAR value).

Data have distinct, well separated distances so that every peer's (unspecified) tie order agrees.
"""
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import KFold

from deepmetric.evaluation import k_reciprocal_rerank, reid_metrics, retrieval_metrics, verification_metrics
from tests.conftest import require_module

PML = "the dev extra (pytorch-metric-learning==2.9.0, make test installs it)"
TORCHREID = "torchreid==0.2.5, which make test installs with --no-deps"
pml_acc = require_module("pytorch_metric_learning.utils.accuracy_calculator", PML)
warnings.filterwarnings("ignore", message="Cython evaluation")
rank_mod = require_module("torchreid.reid.metrics.rank", TORCHREID)
rerank_mod = require_module("torchreid.reid.utils.rerank", TORCHREID)

PML_KEYS = {"precision_at_1": "precision@1", "mean_average_precision_at_r": "map@r",
            "r_precision": "r_precision", "mean_average_precision": "map", "mean_reciprocal_rank": "mrr"}
PML_TOL = {"mean_reciprocal_rank": 1e-6}  # PML averages the reciprocal ranks in float32


def clustered(n, d, classes, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d))[y] + spread * rng.standard_normal((n, d))
    return x.astype(np.float32), y


def assert_separated(q, qy, g, gy, exclude_self=False, rel_gap=2e-6):
    """The data check behind 'distinct distances': wherever a relevant and an irrelevant item are adjacent in
    a query's exact ranking, their squared distances differ by more than rel_gap × the row's largest
    (float32 rounding is ~1e-7 of it), so every exact kNN, whatever its arithmetic, gives the same metrics."""
    d = ((q.astype(np.float64)[:, None] - g.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1)[:, int(exclude_self):]  # the query itself is the 0 in front
    s, rel = np.take_along_axis(d, order, 1), gy[order] == qy[:, None]
    flips = rel[:, 1:] != rel[:, :-1]
    assert (np.diff(s, axis=1)[flips] > rel_gap * s[:, -1:].repeat(flips.shape[1], 1)[flips]).all()


def pml(query, qy, gallery=None, gy=None):
    calc = pml_acc.AccuracyCalculator(include=tuple(PML_KEYS), k=None, device=torch.device("cpu"))
    return calc.get_accuracy(query, qy, gallery, gy)


def test_pml_leave_one_out():
    x, y = clustered(150, 32, 25, seed=4)
    assert_separated(x, y, x, y, exclude_self=True)
    ours = retrieval_metrics(x, y, distance="euclidean")
    for k, v in pml(x, y).items():
        assert ours[PML_KEYS[k]] == pytest.approx(v, abs=PML_TOL.get(k, 1e-9)), k


def test_pml_query_gallery():
    x, y = clustered(230, 32, 20, seed=4)
    q, qy, g, gy = x[:80], y[:80], x[80:], y[80:]
    assert_separated(q, qy, g, gy)
    ours = retrieval_metrics(q, qy, g, gy, distance="euclidean")
    for k, v in pml(q, qy, g, gy).items():
        assert ours[PML_KEYS[k]] == pytest.approx(v, abs=PML_TOL.get(k, 1e-9)), k


def test_pml_cosine_equals_l2_on_normalised():
    x, y = clustered(150, 32, 25, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert_separated(x, y, x, y, exclude_self=True)
    ours = retrieval_metrics(x, y, distance="cosine")
    for k, v in pml(x, y).items():
        assert ours[PML_KEYS[k]] == pytest.approx(v, abs=PML_TOL.get(k, 1e-9)), k


def naive_p1_map(x, y):
    """Leave-one-out P@1 and full MAP by brute force, with exact label comparison."""
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    p1, aps = [], []
    for i in range(len(x)):
        rel = (y[np.argsort(d[i], kind="stable")] == y[i])[:-1]
        if rel.any():
            p1.append(rel[0])
            hits = np.cumsum(rel)
            aps.append(np.mean(hits[rel] / (np.nonzero(rel)[0] + 1)))
    return float(np.mean(p1)), float(np.mean(aps))


def test_labels_above_2_pow_24_pml_collides_we_do_not():
    x, cls = clustered(200, 16, 40, seed=4, spread=2.0)
    labels = (1 << 24) + cls  # 2**24 + 2j + 1 and its neighbours round to the same float32
    assert len(np.unique(labels.astype(np.float32))) < len(np.unique(labels))
    truth = naive_p1_map(x, labels)
    collided = naive_p1_map(x, labels.astype(np.float32))
    with pytest.warns(UserWarning, match="2 of 200"):  # two singleton classes: skipped, and said so
        ours = retrieval_metrics(x, labels, distance="euclidean")
    theirs = pml(x, labels)
    assert (ours["precision@1"], ours["map"]) == pytest.approx(truth, abs=1e-12)
    assert (theirs["precision_at_1"], theirs["mean_average_precision"]) == pytest.approx(collided, abs=1e-6)
    assert theirs["precision_at_1"] > truth[0] + 0.02  # PML counts merged classes as matches
    with pytest.warns(UserWarning):
        ours_t = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(labels), distance="euclidean")
    assert ours_t["precision@1"] == ours["precision@1"]


def test_per_query_ap_matches_sklearn():
    x, y = clustered(120, 16, 12, seed=0)
    assert_separated(x, y, x, y, exclude_self=True)
    ours = retrieval_metrics(x, y, distance="euclidean", return_per_query=True)["per_query"]["ap"]
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        rel = y[keep] == y[i]
        if rel.any():
            assert ours[i] == pytest.approx(average_precision_score(rel, -d[i, keep]), abs=1e-12)
        else:
            assert np.isnan(ours[i])


def reid_data(seed, n_q=60, n_g=300, pids=40, cams=6):
    rng = np.random.default_rng(seed)
    dist = rng.random((n_q, n_g))  # float64 uniform: distinct with probability 1
    pid_q, pid_g = rng.integers(0, pids, n_q), rng.integers(0, pids, n_g)
    return dist, pid_q, pid_g, rng.integers(0, cams, n_q), rng.integers(0, cams, n_g)


def independent_minp(dist, q_pids, g_pids, q_cams, g_cams):
    inps = []
    for i in range(len(dist)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        hits = np.nonzero(g_pids[order][keep] == q_pids[i])[0]
        if len(hits):
            inps.append(len(hits) / (hits[-1] + 1))
    return float(np.mean(inps))


@pytest.mark.parametrize("seed", [0, 1])
def test_torchreid_cmc_map_and_minp(seed):
    dist, qp, gp, qc, gc = reid_data(seed)
    cmc, mAP = rank_mod.evaluate_rank(dist, qp, gp, qc, gc, max_rank=50, use_cython=False)
    ours = reid_metrics(dist, qp, gp, qc, gc, max_rank=50)
    np.testing.assert_allclose(ours["cmc"], cmc, atol=1e-6)
    assert ours["map"] == pytest.approx(mAP, abs=1e-12)
    assert ours["rank1"] == pytest.approx(cmc[0], abs=1e-6) and ours["rank10"] == pytest.approx(cmc[9], abs=1e-6)
    assert ours["minp"] == pytest.approx(independent_minp(dist, qp, gp, qc, gc), abs=1e-12)
    n_valid = sum((gp == p).any() and ((gp == p) & (gc != c)).any() for p, c in zip(qp, qc))
    assert ours["num_queries"] - ours["skipped_queries"] == n_valid


@pytest.mark.parametrize("dtype,k1,k2", [(np.float32, 20, 6), (np.float64, 20, 6), (np.float32, 7, 1),
                                         (np.float32, 9, 3)])
def test_torchreid_re_ranking(dtype, k1, k2):
    rng = np.random.default_rng(k1 + k2)
    pid = rng.integers(0, 15, 200)
    x = rng.standard_normal((15, 24))[pid] + 0.8 * rng.standard_normal((200, 24))
    x = x.astype(dtype)
    sq = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1).astype(dtype)  # torchreid feeds squared L2
    q, g = x[:40], x[40:]
    qg, qq, gg = sq(q, g), sq(q, q), sq(g, g)
    expected = rerank_mod.re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=0.3)
    ours = k_reciprocal_rerank(qg, qq, gg, k1=k1, k2=k2, lambda_value=0.3)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    ours_t = k_reciprocal_rerank(torch.from_numpy(qg), torch.from_numpy(qq), torch.from_numpy(gg), k1=k1, k2=k2)
    np.testing.assert_allclose(ours_t, expected, atol=1e-5, rtol=0)


def lfw_reference(dist, same, n_folds=10):
    """The 10-fold protocol written from its description (the module docstring), loop by loop."""
    thresholds = np.arange(0, 4, 0.01)
    accs, best_thr = [], []
    folds = KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(dist)))
    for train, test in folds:
        train_acc = [np.mean(np.less(dist[train], t) == same[train]) for t in thresholds]
        t = thresholds[int(np.argmax(train_acc))]
        best_thr.append(t)
        accs.append(np.mean(np.less(dist[test], t) == same[test]))
    val_thresholds = np.arange(0, 4, 0.001)
    vals, fars = [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(dist))):
        far_train = np.array([np.sum(np.less(dist[train], t) & ~same[train]) / np.sum(~same[train])
                              for t in val_thresholds])
        if far_train.max() >= 1e-3:
            seen, xs, ys = set(), [], []
            for f, t in zip(far_train, val_thresholds):  # first threshold of each FAR value
                if f not in seen:
                    seen.add(f), xs.append(f), ys.append(t)
            from scipy.interpolate import interp1d
            thr = float(interp1d(xs, ys, kind="slinear")(1e-3))
        else:
            thr = 0.0
        pred = np.less(dist[test], thr)
        vals.append(np.sum(pred & same[test]) / np.sum(same[test]))
        fars.append(np.sum(pred & ~same[test]) / np.sum(~same[test]))
    return np.mean(accs), np.std(accs), np.mean(best_thr), np.mean(vals), np.mean(fars)


@pytest.mark.parametrize("n_pairs", [600, 613])
def test_lfw_ten_fold_protocol(n_pairs):
    rng = np.random.default_rng(n_pairs)
    same = rng.random(n_pairs) < 0.5
    dist = np.where(same, rng.normal(0.9, 0.35, n_pairs), rng.normal(1.6, 0.3, n_pairs)).clip(0, 3.999)
    dist = np.round(dist, 5)  # many pairs sit exactly on the 0.01 grid's neighbourhood; ties are allowed here
    acc, std, thr, val, far = lfw_reference(dist, same)
    ours = verification_metrics(dist, same, n_folds=10)
    assert ours["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert ours["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert ours["threshold"] == pytest.approx(thr, abs=1e-12)
    assert ours["tar@far=1e-3"] == pytest.approx(val, abs=1e-12)
    assert ours["far@far=1e-3"] == pytest.approx(far, abs=1e-12)
    assert ours["auc"] == pytest.approx(roc_auc_score(same, -dist), abs=1e-12)
