"""Losses without a PML twin, checked against naive loops written from the formulas (value and
gradient, float64). Each reference loops over anchors / pairs in Python on a small batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses import build_loss

torch.manual_seed(0)


def pk_labels(n: int, k: int, seed: int = 0, shuffle: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) // k
    return y[torch.randperm(n, generator=g)] if shuffle else y


def emb(n: int, d: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def check(ours_fn, ref_fn, x, y, rtol=1e-9, atol=1e-11):
    a = ours_fn(x, y)
    (ga,) = torch.autograd.grad(a, x)
    b = ref_fn(x, y)
    (gb,) = torch.autograd.grad(b, x)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


def sqdist(a, b):
    return ((a - b) ** 2).sum()


# ---------------------------------------------------------------- Paddle quadruplet (MSML)
def naive_msml(x, y, margin=0.1):
    xn = [v / v.norm() for v in x]
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j:
                continue
            (pos if y[i] == y[j] else neg).append(sqdist(xn[i], xn[j]))
    return torch.relu(max(pos) - min(neg) + margin)


def test_quadruplet_matches_naive():
    x, y = emb(16, 8), pk_labels(16, 4)
    check(build_loss("quadruplet", margin=0.3), lambda x, y: naive_msml(x, y, 0.3), x, y)


# ---------------------------------------------------------------- Paddle EML
def naive_eml(x, y, beta=1e5, thresh=20.0):
    losses = []
    norm = math.log(1 + beta)
    for i in range(len(y)):
        dp = [sqdist(x[i], x[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        dn = [sqdist(x[i], x[j]) for j in range(len(y)) if y[j] != y[i]]
        pmax, nmin = max(dp), min(dn)
        theta = sum(torch.exp(p - pmax) for p in dp) / len(dp) * sum(torch.exp(nmin - n) for n in dn) / len(dn)
        bias = pmax - nmin

        def f(b):
            return torch.log(1 + beta * theta * torch.exp(b)) / norm

        def g(b):
            return (torch.log(theta) + b + math.log(beta)) / norm

        t = torch.tensor(thresh, dtype=x.dtype)
        losses.append(f(torch.minimum(bias, t)) + g(torch.maximum(bias, t)) - f(t))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("scale", [0.1, 3.0])  # small distances: f branch; large: the linear branch
def test_eml_matches_naive(scale):
    x, y = emb(12, 8, scale=scale), pk_labels(12, 3)
    check(build_loss("eml"), naive_eml, x, y)


def test_eml_equals_log_mean_exp_form_for_moderate_bias():
    # f(b) + g(T) - f(T) ~= f(b) when beta theta e^T >> 1: the documented meaning of the loss
    x, y = emb(12, 8, scale=0.2), pk_labels(12, 3)
    loss = build_loss("eml")(x, y)
    ref = []
    for i in range(12):
        terms = [torch.exp(sqdist(x[i], x[p]) - sqdist(x[i], x[n])) for p in range(12) if p != i and y[p] == y[i]
                 for n in range(12) if y[n] != y[i]]
        ref.append(torch.log(1 + 1e5 * sum(terms) / len(terms)) / math.log(1 + 1e5))
    torch.testing.assert_close(loss, sum(ref) / 12, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- N-pairs with the Paddle regulariser
def naive_npairs(x, y, l2_reg=0.01):
    anchors, positives, seen = [], [], set()
    for i in range(len(y)):
        c = int(y[i])
        if c in seen:
            continue
        same = [j for j in range(len(y)) if y[j] == c and j != i]
        if same:
            seen.add(c)
            anchors.append(x[i])
            positives.append(x[same[0]])
    loss = 0
    for k, a in enumerate(anchors):
        logits = torch.stack([a @ p for p in positives])
        loss = loss - (logits[k] - torch.logsumexp(logits, 0))
    reg = 0.5 * l2_reg * sum((v ** 2).sum() for v in x) / len(x)
    return loss / len(anchors) + reg


def test_npairs_raw_with_l2_reg_matches_naive():
    x, y = emb(16, 8, scale=0.5), pk_labels(16, 2)
    check(build_loss("npairs", l2_reg=0.01, normalize=False), naive_npairs, x, y)


# ---------------------------------------------------------------- XBM contrastive
def naive_xbm_contrastive(x, y, margin=0.5, eps=1e-5, ref=None, ref_y=None):
    xn = F.normalize(x, dim=1)
    rn = xn if ref is None else F.normalize(ref, dim=1)
    ry = y if ref_y is None else ref_y
    total = 0
    for i in range(len(y)):
        for j in range(len(ry)):
            if ref is None and i == j:
                continue
            s = xn[i] @ rn[j]
            if ry[j] == y[i] and s < 1 - eps:
                total = total + (1 - s)
            elif ry[j] != y[i] and s > margin:
                total = total + s
    return total / len(y)


def test_contrastive_xbm_matches_naive():
    x, y = emb(16, 4), pk_labels(16, 4)  # low dimension: many similarities above the margin
    check(build_loss("contrastive_xbm", margin=0.2), lambda x, y: naive_xbm_contrastive(x, y, 0.2), x, y)


def test_contrastive_xbm_against_memory_drops_duplicates_by_epsilon():
    x, y = emb(8, 4), pk_labels(8, 2)
    ref, ref_y = x.detach().clone(), y.clone()  # exact copies: s = 1 >= 1 - eps, dropped
    ours = build_loss("contrastive_xbm")(x, y, ref_embeddings=ref, ref_labels=ref_y)
    torch.testing.assert_close(ours, naive_xbm_contrastive(x, y, ref=ref, ref_y=ref_y))


# ---------------------------------------------------------------- Centroids-ReID CTL
def batch_hard_original(z, labels, margin):
    """open-reid / Centroids-ReID TripletLoss: sqrt(clamp(d^2, 1e-12)), self in the positives."""
    n = len(labels)
    d = torch.stack([torch.stack([sqdist(z[i], z[j]).clamp(min=1e-12).sqrt() for j in range(n)]) for i in range(n)])
    losses = []
    for i in range(n):
        ap = max(d[i, j] for j in range(n) if labels[j] == labels[i])
        an = min(d[i, j] for j in range(n) if labels[j] != labels[i])
        losses.append(torch.relu(ap - an + margin))
    return sum(losses) / n


def naive_ctl(x, y, margin=0.5):
    """Rounds by occurrence order within each class; leave-one-out centroids; mean over rounds."""
    classes = list(dict.fromkeys(int(c) for c in y))
    members = {c: [i for i in range(len(y)) if int(y[i]) == c] for c in classes}
    members = {c: m for c, m in members.items() if len(m) >= 2}
    rounds = []
    for r in range(max(len(m) for m in members.values())):
        qs, cs, labs = [], [], []
        for c, m in members.items():
            if r < len(m):
                qs.append(x[m[r]])
                cs.append(sum(x[j] for j in m if j != m[r]) / (len(m) - 1))
                labs.append(c)
        if len(labs) >= 2:
            rounds.append(batch_hard_original(qs + cs, labs + labs, margin))
    return sum(rounds) / len(rounds)


@pytest.mark.parametrize("layout", ["contiguous", "shuffled", "ragged"])
def test_centroid_triplet_matches_naive(layout):
    if layout == "ragged":
        y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2, 0, 4, 1, 1, 3])  # sizes 4, 4, 3, 2 and a singleton
    else:
        y = pk_labels(12, 4, shuffle=layout == "shuffled")
    x = emb(len(y), 6)
    check(build_loss("centroid_triplet", margin=0.5), naive_ctl, x, y)


def test_centroid_triplet_against_reference_matches_naive():
    x, y = emb(6, 5), torch.tensor([0, 1, 2, 0, 1, 3])
    ref, ref_y = emb(10, 5, seed=1).detach(), torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 4, 4])
    exclude = torch.tensor([0, -1, 5, -1, 2, -1])  # query 0's copy is ref 0, etc.

    def ref_fn(x, y):
        losses = []
        for i in range(len(y)):
            own = [j for j in range(10) if ref_y[j] == y[i] and j != exclude[i]]
            others = sorted({int(c) for c in ref_y if c != y[i]})
            if not own or not others:
                continue
            c_own = sum(ref[j] for j in own) / len(own)
            cents = [sum(ref[j] for j in range(10) if ref_y[j] == c) / int((ref_y == c).sum()) for c in others]
            d_p = sqdist(x[i], c_own).clamp(min=1e-12).sqrt()
            d_n = min(sqdist(x[i], c).clamp(min=1e-12).sqrt() for c in cents)
            losses.append(torch.relu(d_p - d_n + 0.5))
        return sum(losses) / len(losses)

    loss = build_loss("centroid_triplet")
    check(lambda x, y: loss(x, y, ref_embeddings=ref, ref_labels=ref_y, ref_exclude=exclude), ref_fn, x, y)


# ---------------------------------------------------------------- center loss, class-level circle
def test_center_loss_matches_naive():
    loss = build_loss("center", num_classes=5, embedding_dim=6).double()
    x, y = emb(10, 6), torch.randint(0, 5, (10,), generator=torch.Generator().manual_seed(1))
    check(loss, lambda x, y: sum(sqdist(x[i], loss.weight[y[i]]) for i in range(10)) / 10, x, y)


def test_circle_class_matches_naive():
    m, gamma, c = 0.25, 32.0, 7
    loss = build_loss("circle_class", num_classes=c, embedding_dim=6, m=m, gamma=gamma).double()
    x, y = emb(10, 6), torch.randint(0, c, (10,), generator=torch.Generator().manual_seed(2))

    def ref_fn(x, y):
        total = 0
        for i in range(len(y)):
            logits = []
            for k in range(c):
                s = (x[i] / x[i].norm()) @ (loss.weight[k] / loss.weight[k].norm())
                if k == y[i]:
                    logits.append(gamma * torch.relu(1 + m - s.detach()) * (s - (1 - m)))
                else:
                    logits.append(gamma * torch.relu(s.detach() + m) * (s - m))
            logits = torch.stack(logits)
            total = total - (logits[y[i]] - torch.logsumexp(logits, 0))
        return total / len(y)

    check(loss, ref_fn, x, y)


# ---------------------------------------------------------------- triplet with a reference and ref_exclude
def test_triplet_all_with_reference_and_exclusion_matches_naive():
    x, y = emb(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    ref, ref_y = emb(9, 5, seed=3).detach(), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 3])
    exclude = torch.tensor([0, 2, -1, 6, -1, 4])
    margin = 0.3

    def ref_fn(x, y):
        xn, rn = F.normalize(x, dim=1), F.normalize(ref, dim=1)
        terms = []
        for a in range(6):
            for p in range(9):
                for n in range(9):
                    if p == exclude[a] or n == exclude[a] or ref_y[p] != y[a] or ref_y[n] == y[a]:
                        continue
                    terms.append(torch.relu((xn[a] - rn[p]).norm() - (xn[a] - rn[n]).norm() + margin))
        nonzero = [t for t in terms if t > 0]
        return sum(nonzero) / len(nonzero)

    loss = build_loss("triplet", margin=margin)
    check(lambda x, y: loss(x, y, ref_embeddings=ref, ref_labels=ref_y, ref_exclude=exclude), ref_fn, x, y)


# ---------------------------------------------------------------- triplet reductions (nonzero / mean)
def _reduce(terms, reduction):
    if reduction == "mean":
        return sum(terms) / len(terms)
    nonzero = [t for t in terms if t > 0]
    return sum(nonzero) / len(nonzero) if nonzero else sum(terms) * 0.0


def _dist(x, normalize):
    z = F.normalize(x, dim=1) if normalize else x
    return lambda i, j: sqdist(z[i], z[j]).clamp(min=1e-12).sqrt()


def naive_triplet(x, y, margin, mining, reduction, normalize=True, terms=None):
    """Euclidean triplet terms by a loop over anchors: ``hard`` one term per anchor that has a
    positive and a negative; ``all`` / ``semihard`` one per (a, p, n) (semihard: d_ap < d_an < d_ap + m).
    The terms are appended to ``terms`` when given."""
    d, n, terms = _dist(x, normalize), len(y), [] if terms is None else terms
    for a in range(n):
        ps = [p for p in range(n) if p != a and y[p] == y[a]]
        ns = [j for j in range(n) if y[j] != y[a]]
        if not ps or not ns:
            continue
        if mining == "hard":
            terms.append(torch.relu(max(d(a, p) for p in ps) - min(d(a, j) for j in ns) + margin))
            continue
        for p in ps:
            for j in ns:
                if mining == "semihard" and not d(a, p) < d(a, j) < d(a, p) + margin:
                    continue
                terms.append(torch.relu(d(a, p) - d(a, j) + margin))
    return _reduce(terms, reduction)


# a singleton class (label 9): an anchor without a positive, counted by neither reduction
LABELS_WITH_SINGLETON = torch.tensor([0, 1, 0, 2, 1, 0, 2, 9, 1, 2, 0, 1])


@pytest.mark.parametrize("reduction", ["nonzero", "mean"])
@pytest.mark.parametrize("mining, normalize", [("hard", True), ("hard", False), ("all", True), ("semihard", True)])
def test_triplet_reductions_match_naive(mining, normalize, reduction):
    y = LABELS_WITH_SINGLETON
    g = torch.Generator().manual_seed(0)  # clustered by class: some triplets satisfied, some not
    centres = torch.randn(10, 6, generator=g, dtype=torch.float64)
    x = (centres[y] + 0.6 * torch.randn(12, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    margin = 0.5 if normalize else 1.0
    terms: list = []
    naive_triplet(x, y, margin, mining, "mean", normalize, terms)
    if mining != "semihard":  # the case that tells the reductions apart: zero and non-zero terms
        assert 0 < sum(int(t > 0) for t in terms) < len(terms)
    loss = build_loss("triplet", margin=margin, mining=mining, normalize=normalize, reduction=reduction)
    check(loss, lambda x, y: naive_triplet(x, y, margin, mining, reduction, normalize), x, y)


def test_triplet_random_reductions_match_naive_on_the_same_draws():
    from deepmetric.losses.miners import gather_positives, random_negatives

    x, y = emb(12, 6), LABELS_WITH_SINGLETON
    same = y[:, None] == y[None, :]
    pos, neg = same & ~torch.eye(12, dtype=torch.bool), ~same
    torch.manual_seed(7)
    p_idx, p_valid = gather_positives(pos)
    n_idx, n_valid = random_negatives(p_idx, neg)

    def ref_fn(x, reduction):
        d = _dist(x, True)
        terms = [torch.relu(d(a, int(p_idx[a, k])) - d(a, int(n_idx[a, k])) + 0.3)
                 for a in range(12) for k in range(p_idx.shape[1]) if p_valid[a, k] and n_valid[a, k]]
        return _reduce(terms, reduction)

    for reduction in ("nonzero", "mean"):
        loss = build_loss("triplet", margin=0.3, mining="random", reduction=reduction)

        def ours(x, y):
            torch.manual_seed(7)  # the loss draws its negatives with the same single torch.rand call
            return loss(x, y)

        check(ours, lambda x, y: ref_fn(x, reduction), x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triplet_hard_mean_is_the_centroids_reid_form(dtype):
    """reduction=mean on raw features equals open-reid/Centroids-ReID's TripletLoss (MarginRankingLoss,
    mean over all anchors) on a P x K batch, including batches where most terms are zero."""
    for spread, margin in ((1.0, 0.5), (0.6, 0.5)):  # the second: clustered, 3 of 12 terms > 0
        y = pk_labels(12, 3)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 6, generator=g, dtype=dtype)[y] + spread * torch.randn(12, 6, generator=g, dtype=dtype)
        x.requires_grad_(True)
        loss = build_loss("triplet", margin=margin, mining="hard", distance="euclidean", normalize=False,
                          reduction="mean")
        tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        check(loss, lambda x, y: batch_hard_original(x, y, margin), x, y, **tol)


def test_triplet_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="reduction='sum' is not one of nonzero, mean"):
        build_loss("triplet", reduction="sum")


# ---------------------------------------------------------------- mined multi-similarity against a memory
def naive_ms_mined(x, y, ref, ref_y, exclude, eps=0.1, alpha=2.0, beta=50.0, base=0.5):
    xn, rn = F.normalize(x, dim=1), F.normalize(ref, dim=1)
    terms = []
    for i in range(len(y)):
        s = {j: xn[i] @ rn[j] for j in range(len(ref_y)) if j != exclude[i]}
        pos = [j for j in s if ref_y[j] == y[i]]
        neg = [j for j in s if ref_y[j] != y[i]]
        term = x.sum() * 0
        if pos and neg:
            hardest_neg, hardest_pos = max(s[j] for j in neg), min(s[j] for j in pos)
            kept_pos = [s[j] for j in pos if s[j] - eps < hardest_neg]
            kept_neg = [s[j] for j in neg if s[j] + eps > hardest_pos]
            if kept_pos:
                term = term + torch.log(1 + sum(torch.exp(-alpha * (v - base)) for v in kept_pos)) / alpha
            if kept_neg:
                term = term + torch.log(1 + sum(torch.exp(beta * (v - base)) for v in kept_neg)) / beta
        terms.append(term)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("regime", ["many_negatives_kept", "few_negatives_kept"])
def test_mined_multi_similarity_against_a_reference_matches_naive(regime):
    """The memory path keeps its pairs as lists; its negatives as a mask (most kept: random
    embeddings) or as a list (few kept: tight, well-separated classes). Rows 0-1 have no positive in
    the reference and row 2's only positive is its excluded own copy."""
    from deepmetric.losses.functional import SPARSE_FRACTION

    g = torch.Generator().manual_seed(3)
    ref_y = torch.arange(60) % 12  # classes 0-11, five copies each
    ref_y[ref_y == 11] = torch.tensor([11, 12, 12, 12, 12])  # class 11 has a single copy
    y = torch.tensor([13, 14, 11, 0, 0, 1, 2, 3, 5, 5])
    spread = 1.0 if regime == "many_negatives_kept" else 0.05
    centers = torch.randn(15, 16, generator=g, dtype=torch.float64) * (0.1 if regime == "many_negatives_kept" else 1)
    centers[4] = centers[5] + 0.2 * torch.randn(16, generator=g, dtype=torch.float64)  # a near class
    ref = (centers[ref_y] + spread * torch.randn(60, 16, generator=g, dtype=torch.float64)).detach()
    x = (centers[y] + spread * torch.randn(10, 16, generator=g, dtype=torch.float64)).requires_grad_(True)
    exclude = torch.tensor([-1, 4, 55, 0, -1, 1, -1, -1, 17, 29])  # 55: the only class-11 copy
    with torch.no_grad():  # the premise: which way the negatives go
        s = F.normalize(x, dim=1) @ F.normalize(ref, dim=1).T
        pos = (y[:, None] == ref_y[None]) & (torch.arange(60)[None] != exclude[:, None])
        neg = (y[:, None] != ref_y[None]) & (torch.arange(60)[None] != exclude[:, None])
        hp = s.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
        kept = int((neg & (s + 0.1 > hp)).sum())
    assert kept > 0 and (kept > SPARSE_FRACTION * s.numel()) == (regime == "many_negatives_kept"), kept
    loss = build_loss("multi_similarity", miner_epsilon=0.1)
    check(lambda x, y: loss(x, y, ref_embeddings=ref, ref_labels=ref_y, ref_exclude=exclude),
          lambda x, y: naive_ms_mined(x, y, ref, ref_y, exclude), x, y)
