"""Tuple mining on a dense ``(N, M)`` matrix with pair masks, vectorised (no loop over anchors).

Unlike PML's miners these return no index lists: the MS miner returns refined pair masks, and the
triplet functions return the reduced loss and its gradient with respect to the distance matrix
(``(value, grad)``, see :func:`deepmetric.losses.functional.similarity_loss`), which keeps memory
at O(N M) even for "all triplets".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import reduce_terms


def multi_similarity_mine(sim: Tensor, pos: Tensor, neg: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """MS pair mining (Wang et al., CVPR 2019; PML ``MultiSimilarityMiner``) on similarities.

    Keeps positive ``(i, p)`` if ``s_ip - epsilon < max_n s_in`` and negative ``(i, n)`` if
    ``s_in + epsilon > min_p s_ip``. Anchors without negatives keep no positive and vice versa.
    """
    with torch.no_grad():
        s = sim.detach()
        big = torch.finfo(s.dtype).max
        hardest_neg = s.masked_fill(~neg, -big).amax(1, keepdim=True)
        hardest_pos = s.masked_fill(~pos, big).amin(1, keepdim=True)
        return pos & (s - epsilon < hardest_neg), neg & (s + epsilon > hardest_pos)


def gather_positives(pos: Tensor) -> tuple[Tensor, Tensor]:
    """Column indices of each anchor's positives, padded: ``idx (N, K)`` and ``valid (N, K)``,
    K = the largest number of positives of any anchor (0 if none)."""
    counts = pos.sum(1)
    k = int(counts.max()) if counts.numel() else 0
    if k == 0:
        empty = torch.zeros(pos.shape[0], 0, dtype=torch.long, device=pos.device)
        return empty, empty.bool()
    val, idx = pos.to(torch.float32).topk(k, dim=1)
    return idx, val > 0


def random_negatives(pos_idx: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """One uniformly random negative for each (anchor, padded positive) slot, distinct within an
    anchor while enough negatives exist. Returns ``idx (N, K)`` and ``valid (N, K)``."""
    scores = torch.rand(neg.shape, device=neg.device).masked_fill(~neg, -1.0)
    idx = scores.topk(pos_idx.shape[1], dim=1).indices  # K <= M: positives are columns too
    return idx, neg.gather(1, idx)


Terms = tuple[Tensor, Optional[Tensor]]  # (loss value, d loss / d dist or None)


def _pairs_grad(dist: Tensor, p_idx: Tensor, n_idx: Tensor, weight: Tensor) -> Tensor:
    """Gradient of ``sum weight * (d[a, p] - d[a, n])`` with respect to ``dist``."""
    grad = torch.zeros_like(dist).scatter_add_(1, p_idx, weight)
    return grad.scatter_add_(1, n_idx, -weight)


def batch_hard_terms(dist: Tensor, pos: Tensor, neg: Tensor, margin: float, need_grad: bool,
                     reduction: str = "nonzero") -> Terms:
    """Batch-hard triplet (Hermans et al. 2017; PML ``BatchHardMiner``): per anchor with both, the
    farthest positive and the closest negative; ``[d_ap - d_an + margin]_+``. ``reduction``
    ``nonzero``: AvgNonZero (PML); ``mean``: over every anchor with both (open-reid, Centroids-ReID)."""
    valid = pos.any(1) & neg.any(1)
    big = torch.finfo(dist.dtype).max
    d_ap, p_idx = dist.masked_fill(~pos, -big).max(1, keepdim=True)
    d_an, n_idx = dist.masked_fill(~neg, big).min(1, keepdim=True)
    terms = torch.where(valid[:, None], (d_ap - d_an + margin).clamp_min_(0.0), 0.0)
    value, weight = reduce_terms(terms, valid[:, None], reduction)
    return value, _pairs_grad(dist, p_idx, n_idx, weight) if need_grad else None


def random_triplet_terms(dist: Tensor, pos: Tensor, neg: Tensor, margin: float, need_grad: bool,
                         reduction: str = "nonzero") -> Terms:
    """One random negative per (anchor, positive) pair; ``[d_ap - d_an + margin]_+``. ``reduction``
    ``nonzero``: AvgNonZero; ``mean``: over every (anchor, positive, negative) drawn (Paddle)."""
    p_idx, p_valid = gather_positives(pos)
    n_idx, n_valid = random_negatives(p_idx, neg)
    counted = p_valid & n_valid
    terms = (dist.gather(1, p_idx) - dist.gather(1, n_idx) + margin).clamp_min_(0.0)
    value, weight = reduce_terms(terms.mul_(counted), counted, reduction)
    return value, _pairs_grad(dist, p_idx, n_idx, weight) if need_grad else None


def triplet_margin_terms(dist: Tensor, pos: Tensor, neg: Tensor, margin: float, semihard: bool,
                         need_grad: bool, reduction: str = "nonzero") -> Terms:
    """``[d_ap - d_an + margin]_+`` over all triplets (a, p, n) with ``p`` a positive and ``n`` a
    negative of ``a``, reduced by AvgNonZero (``nonzero``, PML) or over every triplet (``mean``);
    ``semihard`` keeps only ``d_an > d_ap`` (PML
    ``TripletMarginMiner(margin, type_of_triplets="semihard")`` with the loss's own margin), whose
    mined triplets all have a term > 0, so both reductions agree there.

    Never materialises the triplets: each anchor's negative distances are sorted once; for a positive
    with threshold ``t = d_ap + margin`` the violating negatives are a contiguous run of the sorted
    row (``d_an < t``, and ``> d_ap`` if semihard), whose sum ``c t - sum d_an`` comes from a float64
    prefix sum (so the cancellation costs no precision). The gradient is ``+c`` on each ``d_ap`` and
    minus the number of covering runs on each ``d_an``. Memory O(N M), time O(N M log M).
    """
    idx, valid = gather_positives(pos)
    valid &= neg.any(1, keepdim=True)
    d_ap = dist.gather(1, idx)
    thresh = d_ap + margin
    neg_sorted, order = dist.masked_fill(~neg, float("inf")).sort(dim=1)
    hi = torch.searchsorted(neg_sorted, thresh, right=False)  # negatives with d_an < t
    if semihard:
        lo = torch.searchsorted(neg_sorted, d_ap, right=True)  # ... and d_an > d_ap
        hi = torch.maximum(hi, lo)
    else:
        lo = torch.zeros_like(hi)
    hi, lo = hi * valid, lo * valid
    counts = hi - lo
    finite = torch.where(torch.isinf(neg_sorted), 0.0, neg_sorted).double()
    csum = F.pad(finite.cumsum(1), (1, 0))  # csum[:, c] = sum of the c smallest
    total = (counts * thresh.double() - (csum.gather(1, hi) - csum.gather(1, lo))).sum()
    if reduction == "mean" and not semihard:
        n_terms = (valid * neg.sum(1, keepdim=True)).sum().clamp_min(1)
    else:
        n_terms = counts.sum().clamp_min(1)
    value = (total / n_terms).to(dist.dtype)
    if not need_grad:
        return value, None
    grad = torch.zeros_like(dist).scatter_add_(1, idx, counts.to(dist.dtype))
    ones = valid.to(dist.dtype)
    runs = torch.zeros(dist.shape[0], dist.shape[1] + 1, dtype=dist.dtype, device=dist.device)
    runs = runs.scatter_add_(1, lo, ones).scatter_add_(1, hi, -ones).cumsum_(1)[:, :-1]
    grad.scatter_add_(1, order, -runs)
    return value, grad.div_(n_terms.to(dist.dtype))
