"""Triplet-family losses on a distance matrix: triplet (all / batch-hard / semi-hard / random),
the Paddle "quadruplet" loss (really MSML) and Paddle's EML loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import (DISTANCES, REDUCTIONS, PairBatch, chain_unit_distance_, check_choice, eager_loss,
                         unit_distances)
from .miners import batch_hard_terms, random_triplet_terms, triplet_margin_terms
from .pairwise import PairLoss

MININGS = ("all", "hard", "semihard", "random")


class TripletLoss(PairLoss):
    """Triplet margin loss (Weinberger & Saul 2009; Schroff et al., FaceNet, CVPR 2015):
    ``[d_ap - d_an + margin]_+`` over the mined triplets, reduced by ``reduction``:

    - ``nonzero`` (default): the mean over the terms > 0 (PML's AvgNonZero);
    - ``mean``: the mean over every mined triplet, zero terms included (``MarginRankingLoss``'s mean
      in open-reid and Centroids-ReID; Paddle's mean over its triplets).

    ``distance``: ``euclidean`` (not squared, PML's default), ``squared_euclidean`` (Paddle), ``cosine``
    (``1 - cos``, PML's ``CosineSimilarity``), on L2-normalised embeddings unless ``normalize=False``.

    ``mining`` selects the triplets:

    - ``all``: every (a, p, n); PML ``TripletMarginLoss(margin)``. Computed without materialising
      triplets (sorted negatives + prefix sums), O(N M) memory where PML builds N^3 index lists.
    - ``hard``: per anchor the farthest positive and closest negative (Hermans et al. 2017); PML
      ``BatchHardMiner`` + ``TripletMarginLoss``. One term per anchor with a positive and a negative,
      so ``mean`` averages over those anchors (the Centroids-ReID/open-reid form).
    - ``semihard``: triplets with ``d_ap < d_an < d_ap + margin``; PML
      ``TripletMarginMiner(margin, type_of_triplets="semihard")`` + ``TripletMarginLoss(margin)``
      (every mined term is > 0: both reductions agree).
    - ``random``: one random negative per (anchor, positive) pair (like Paddle's triplet reader).

    Warns and returns zero when no (anchor, positive, negative) exists; a batch whose triplets all
    satisfy the margin returns zero without warning.
    """

    name = "triplet"

    def __init__(self, margin: float = 0.05, mining: str = "all", distance: str = "euclidean",
                 normalize: bool = True, reduction: str = "nonzero"):
        super().__init__()
        self.margin = float(margin)
        self.mining = check_choice(self.name, "mining", mining, MININGS)
        self.reduction = check_choice(self.name, "reduction", reduction, REDUCTIONS)
        self.distance = check_choice(self.name, "distance", distance, DISTANCES)
        if self.distance == "cosine" and not normalize:
            raise ValueError("loss 'triplet': distance='cosine' needs normalize=True")
        self.normalize = bool(normalize)

    def compute(self, batch: PairBatch) -> Tensor:
        if not bool((batch.pos.any(1) & batch.neg.any(1)).any()):
            return self.zero(batch, "no anchor has both a positive and a negative")
        pos, neg, m, r = batch.pos, batch.neg, self.margin, self.reduction

        def value_and_grad(mat: Tensor, need_grad: bool):
            d = unit_distances(mat, self.distance) if self.normalize else mat
            if self.mining == "hard":
                value, grad = batch_hard_terms(d, pos, neg, m, need_grad, r)
            elif self.mining == "random":
                value, grad = random_triplet_terms(d, pos, neg, m, need_grad, r)
            else:
                value, grad = triplet_margin_terms(d, pos, neg, m, self.mining == "semihard", need_grad, r)
            if grad is not None and self.normalize:
                chain_unit_distance_(grad, d, self.distance)
            return value, grad

        if self.normalize:  # work on cosine similarities; distances and their slope come from them
            return batch.cosine_loss(value_and_grad)
        return eager_loss(batch.distances(self.distance, normalize=False), value_and_grad)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, "
                f"reduction={self.reduction!r}")


class QuadrupletLoss(PairLoss):
    """Paddle's ``QuadrupletLoss``, which is the Margin Sample Mining Loss (MSML, Xiao et al.,
    arXiv 1710.00478): one term for the whole batch,
    ``L = [max_{(i,p) positive} d_ip - min_{(i,n) negative} d_in + margin]_+``,
    with ``d`` the squared Euclidean distance of L2-normalised embeddings. Not in PML.
    Warns and returns zero when the batch has no positive or no negative pair.
    """

    name = "quadruplet"

    def __init__(self, margin: float = 0.1):
        super().__init__()
        self.margin = float(margin)

    def compute(self, batch: PairBatch) -> Tensor:
        if not (bool(batch.pos.any()) and bool(batch.neg.any())):
            return self.zero(batch, "needs at least one positive and one negative pair")
        d = batch.distances("squared_euclidean", normalize=True)
        big = torch.finfo(d.dtype).max
        hardest_pos = d.masked_fill(~batch.pos, -big).amax()
        hardest_neg = d.masked_fill(~batch.neg, big).amin()
        return F.relu(hardest_pos - hardest_neg + self.margin)


class EMLLoss(PairLoss):
    """Paddle's ``EmlLoss`` (Ensemble Metric Learning, Xu et al., arXiv 1212.6094) on *raw* features
    (not normalised) with squared Euclidean distances ``d``. Per anchor ``i``:

    ``theta = mean_p e^{d_ip - max_p d_ip} * mean_n e^{min_n d_in - d_in}``,
    ``b = max_p d_ip - min_n d_in`` (so ``theta e^b = mean_{p,n} e^{d_ip - d_in}``),
    ``f(b) = log(1 + beta theta e^b) / log(1 + beta)``, ``g(b) = (log theta + b + log beta) / log(1 + beta)``,
    ``l_i = f(min(b, T)) + g(max(b, T)) - f(T)`` (stable piecewise form, T = ``threshold``).

    Mean over anchors with at least one positive and one negative (Paddle's class-grouped batch
    gives every anchor both). Not in PML.
    """

    name = "eml"

    def __init__(self, beta: float = 1e5, threshold: float = 20.0):
        super().__init__()
        self.beta, self.threshold = float(beta), float(threshold)

    def compute(self, batch: PairBatch) -> Tensor:
        pos, neg = batch.pos, batch.neg
        valid = pos.any(1) & neg.any(1)
        if not bool(valid.any()):
            return self.zero(batch, "no anchor has both a positive and a negative")
        d = batch.distances("squared_euclidean", normalize=False)
        big = torch.finfo(d.dtype).max
        pos_max = d.masked_fill(~pos, -big).amax(1, keepdim=True)
        neg_min = d.masked_fill(~neg, big).amin(1, keepdim=True)
        pos_mean = torch.where(pos, d - pos_max, -math.inf).exp().sum(1) / pos.sum(1).clamp_min(1)
        neg_mean = torch.where(neg, neg_min - d, -math.inf).exp().sum(1) / neg.sum(1).clamp_min(1)
        theta = torch.where(valid, pos_mean * neg_mean, 1.0)
        bias = torch.where(valid, (pos_max - neg_min).squeeze(1), 0.0)
        log_beta, norm = math.log(self.beta), math.log1p(self.beta)
        t = self.threshold

        def f(b: Tensor) -> Tensor:
            return torch.log1p(self.beta * theta * torch.exp(b)) / norm

        losses = f(bias.clamp_max(t)) + (theta.log() + bias.clamp_min(t) + log_beta) / norm
        losses = losses - f(torch.full_like(bias, t))
        return (losses * valid).sum() / valid.sum()
