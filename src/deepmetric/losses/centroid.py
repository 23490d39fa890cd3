"""Centroid losses of Centroids-ReID (Wieczorek et al., "On the Unreasonable Effectiveness of
Centroids in Image Retrieval", ICONIP 2021): the centroid triplet loss and the center loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classification import ClassificationLoss
from .functional import EPS_SQ, PairBatch, distance_matrix
from .pairwise import PairLoss


class CentroidTripletLoss(PairLoss):
    """Centroid triplet loss (CTL), on raw (not normalised) embeddings with Euclidean distance
    ``sqrt(max(d^2, 1e-12))``: ``[d(q, c_P) - d(q, c_N) + margin]_+`` with the hardest ``c_N``.

    **In-batch** (no reference), generalising the P x K recipe of Centroids-ReID to any batch:
    each image's *rank* is its position among the images of its class, in batch order (so the
    layout need not be contiguous). Round ``r`` takes the rank-r image of each class as a query and
    the mean of the class's *other* batch images as its leave-one-out centroid. Within a round the
    2P vectors (queries and centroids, both with their class label) go through batch-hard triplet:
    each vector's positive is its partner (query <-> own centroid), its negative the closest vector
    of another class; loss = mean over the round's vectors, then mean over rounds with >= 2 classes.
    Classes with a single image in the batch are ignored (they have no leave-one-out centroid).
    With K images for every class this is exactly the reference implementation.

    **With a reference set** (e.g. a memory bank): centroids are the per-label means of the
    reference; a query's positive is its own label's centroid computed without the excluded pair
    (``ref_exclude``), its negatives the other labels' centroids; mean over queries that have both.

    Warns and returns zero when nothing is valid. Not in PML.
    """

    name = "centroid_triplet"

    def __init__(self, margin: float = 0.5):
        super().__init__()
        self.margin = float(margin)

    def compute(self, batch: PairBatch) -> Tensor:
        if batch.ref is None:
            return self._in_batch(batch)
        return self._against_reference(batch)

    def _in_batch(self, batch: PairBatch) -> Tensor:
        x, n = batch.query, batch.query.shape[0]
        _, inv, counts = torch.unique(batch.labels, return_inverse=True, return_counts=True)
        size = counts[inv]
        usable = size >= 2
        order = torch.argsort(inv, stable=True)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(n, device=x.device) - starts[inv[order]]
        round_ = torch.cat([rank, rank])
        label, use = torch.cat([inv, inv]), torch.cat([usable, usable])
        neg = (round_[:, None] == round_[None, :]) & (label[:, None] != label[None, :])
        neg &= use[:, None] & use[None, :]
        valid = use & neg.any(1)
        if not bool(valid.any()):
            return self.zero(batch, "no round has two classes with >= 2 images each")
        sums = torch.zeros(counts.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add(0, inv, x)
        centroids = (sums[inv] - x) / (size - 1).clamp_min(1)[:, None].to(x.dtype)
        z = torch.cat([x, centroids])
        d = distance_matrix(z, None, "euclidean", unit=False)
        partner = torch.arange(2 * n, device=x.device).roll(n)
        d_ap = d.gather(1, partner[:, None]).squeeze(1)
        d_an = d.masked_fill(~neg, torch.finfo(d.dtype).max).amin(1)
        losses = torch.where(valid, F.relu(d_ap - d_an + self.margin), 0.0)
        rounds = int(rank.max()) + 1
        round_sum = torch.zeros(rounds, dtype=d.dtype, device=d.device).index_add(0, round_, losses)
        round_cnt = torch.zeros(rounds, dtype=d.dtype, device=d.device).index_add(0, round_, valid.to(d.dtype))
        active = round_cnt > 0
        return (round_sum[active] / round_cnt[active]).mean()

    def _against_reference(self, batch: PairBatch) -> Tensor:
        x, ref = batch.query, batch.ref
        assert ref is not None
        classes, inv, counts = torch.unique(batch.ref_labels, return_inverse=True, return_counts=True)
        other = classes[None, :] != batch.labels[:, None]
        pos = batch.pos.to(x.dtype)
        n_pos = pos.sum(1)
        valid = (n_pos > 0) & other.any(1)
        if not bool(valid.any()):
            return self.zero(batch, "no query has both its own and another label in the reference")
        own = (pos @ ref) / n_pos.clamp_min(1)[:, None]
        d_ap = (x - own).pow(2).sum(1).clamp_min(EPS_SQ).sqrt()
        sums = torch.zeros(classes.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add(0, inv, ref)
        d = distance_matrix(x, sums / counts[:, None].to(x.dtype), "euclidean", unit=False)
        d_an = d.masked_fill(~other, torch.finfo(d.dtype).max).amin(1)
        losses = torch.where(valid, F.relu(d_ap - d_an + self.margin), 0.0)
        return losses.sum() / valid.sum()


class CenterLoss(ClassificationLoss):
    """Center loss (Wen et al., ECCV 2016), as used by Centroids-ReID:
    ``L = sum_i |x_i - c_{y_i}|^2 / N`` on raw embeddings; ``weight`` holds the class centres
    ``(num_classes, embedding_dim)``, initialised N(0, 1). Centroids-ReID clamps every entry of its
    (N, C) distance matrix to [1e-12, 1e12], which adds ``1e-12 (C - 1)`` to the loss; we compute only
    the N needed distances and do not add it. Centroids-ReID trains the centres with their own SGD
    (lr 0.5) and rescales their gradient by 1/weight; that belongs to the optimiser setup.
    """

    name = "center"

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__(num_classes, embedding_dim)
        nn.init.normal_(self.weight)

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        return (x - weight[labels]).pow(2).sum() / x.shape[0]
