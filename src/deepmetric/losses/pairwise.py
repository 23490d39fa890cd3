"""Pair-based losses that work on a similarity or distance matrix between a batch and a reference.

Every loss here is called ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None,
ref_exclude=None)`` and returns a scalar; the pair rules (self pairs, ``ref_exclude``) are in
:mod:`deepmetric.losses.functional`. Embeddings are L2-normalised inside unless a loss says otherwise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Loss
from .functional import (
    DISTANCES,
    SPARSE_FRACTION,
    PairBatch,
    autocast_off,
    avg_nonzero,
    chain_unit_distance_,
    check_choice,
    exp_log_weights_,
    masked_logsumexp,
    pair_batch,
    row_logsumexp,
    softplus,
    unit_distances,
    zero_loss,
)
from .miners import multi_similarity_mine


class PairLoss(Loss):
    """Base class: checks the call, builds the pair masks, turns autocast off, calls :meth:`compute`."""

    kind = "pair"
    name = "pair"

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
        ref_exclude: Optional[Tensor] = None,
    ) -> Tensor:
        """``embeddings`` (N, D) float, ``labels`` (N,) int64; optional reference set ``ref_embeddings``
        (M, D) with ``ref_labels`` (M,), and ``ref_exclude`` (N,) int64: the index in the reference of
        each query's own copy (or -1), whose pair is ignored. Returns a 0-dim tensor."""
        batch = pair_batch(embeddings, labels, ref_embeddings, ref_labels, ref_exclude)
        with autocast_off(embeddings.device):
            return self.compute(batch)

    def compute(self, batch: PairBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def zero(self, batch: PairBatch, detail: str) -> Tensor:
        return zero_loss(batch.embeddings, self.name, detail)


class ContrastiveLoss(PairLoss):
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), PML's form.

    ``L = AvgNonZero_{pos}[d_ap - pos_margin]_+ + AvgNonZero_{neg}[neg_margin - d_an]_+`` with ``d`` the
    ``distance`` between L2-normalised embeddings (``euclidean`` = not squared, ``squared_euclidean``,
    ``cosine`` = 1 - cos). Each AvgNonZero is the mean over the pairs whose term is > 0.
    Same as PML ``ContrastiveLoss(pos_margin, neg_margin)`` with its default ``LpDistance``.
    No pair at all (N = 1) warns and returns zero.
    """

    name = "contrastive"

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: str = "euclidean"):
        super().__init__()
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.distance = check_choice(self.name, "distance", distance, DISTANCES)

    def compute(self, batch: PairBatch) -> Tensor:
        if not batch.has_pairs():
            return self.zero(batch, "no pair in the batch")

        def value_and_grad(s: Tensor, need_grad: bool):
            d = unit_distances(s, self.distance)
            pos = batch.pos & (d > self.pos_margin)  # the terms that are > 0 (AvgNonZero)
            neg = batch.neg & (d < self.neg_margin)
            k_pos, k_neg = pos.sum().to(d.dtype), neg.sum().to(d.dtype)
            n_pos, n_neg = k_pos.clamp_min(1), k_neg.clamp_min(1)
            value = (torch.where(pos, d, 0.0).sum() - self.pos_margin * k_pos) / n_pos
            value = value + (self.neg_margin * k_neg - torch.where(neg, d, 0.0).sum()) / n_neg
            if not need_grad:
                return value, None
            grad_d = torch.where(pos, 1.0 / n_pos, torch.where(neg, -1.0 / n_neg, 0.0))
            return value, chain_unit_distance_(grad_d, d, self.distance)

        return batch.cosine_loss(value_and_grad)


class XBMContrastiveLoss(PairLoss):
    """The contrastive loss of the XBM paper (Wang et al., "Cross-Batch Memory for Embedding
    Learning", CVPR 2020; research-xbm and PaddleClas ``ContrastiveLoss``), on cosine similarity ``s``:

    ``L = (1/N) sum_i [ sum_{p: y_p = y_i, s_ip < 1 - epsilon} (1 - s_ip) + sum_{n: y_n != y_i,
    s_in > margin} s_in ]``

    Sums over pairs, mean over the N queries (including those with no active pair). The
    ``s < 1 - epsilon`` rule also drops exact duplicates, as in the original. Embeddings are
    L2-normalised here (the original expects normalised input, so the value is the same).
    PML has no equivalent class.
    """

    name = "contrastive_xbm"

    def __init__(self, margin: float = 0.5, epsilon: float = 1e-5):
        super().__init__()
        self.margin, self.epsilon = float(margin), float(epsilon)

    def compute(self, batch: PairBatch) -> Tensor:
        if not batch.has_pairs():
            return self.zero(batch, "no pair in the batch")

        def value_and_grad(s: Tensor, need_grad: bool):
            pos = batch.pos & (s < 1.0 - self.epsilon)
            neg = batch.neg & (s > self.margin)
            n = s.shape[0]
            value = (torch.where(pos, 1.0 - s, 0.0).sum() + torch.where(neg, s, 0.0).sum()) / n
            return value, (neg.to(s.dtype).sub_(pos.to(s.dtype)).div_(n) if need_grad else None)

        return batch.cosine_loss(value_and_grad)


class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss (Wang et al., CVPR 2019), on cosine similarity ``s``:

    ``l_i = 1/alpha log(1 + sum_{p} e^{-alpha (s_ip - base)}) + 1/beta log(1 + sum_{n} e^{beta (s_in - base)})``

    Mean over all N anchors (anchors with no pair contribute 0), as PML ``MultiSimilarityLoss``.
    ``miner_epsilon`` (e.g. 0.1) first applies the MS pair mining of the paper / PML
    ``MultiSimilarityMiner(epsilon)``: keep positive ``p`` if ``s_ip - eps < max_n s_in`` and negative
    ``n`` if ``s_in + eps > min_p s_ip``. PML quirk not copied: PML returns 0 when the mined tuple has
    at most one positive and one negative pair; we compute the formula.

    Against a reference set (a cross-batch memory) with mining, the pairs are kept as a list instead
    of ``(N, M)`` masks: the mining needs the label positives, one row maximum and one threshold pass,
    and only the kept pairs are exponentiated; the gradient is sparse when few pairs are kept
    (checked against a loop over anchors in ``tests/losses/test_loss_references.py``).
    """

    name = "multi_similarity"

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 miner_epsilon: Optional[float] = None):
        super().__init__()
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)
        self.miner_epsilon = None if miner_epsilon is None else float(miner_epsilon)

    def compute(self, batch: PairBatch) -> Tensor:
        if not batch.has_pairs():
            return self.zero(batch, "no pair in the batch")
        if batch.ref is not None and self.miner_epsilon is not None:
            return batch.cosine_loss(self._mined_pairs_grad(batch))

        def value_and_grad(s: Tensor, need_grad: bool):
            pos, neg = batch.pos, batch.neg
            if self.miner_epsilon is not None:
                pos, neg = multi_similarity_mine(s, pos, neg, self.miner_epsilon)
            shifted = s - self.base
            x_pos = shifted * -self.alpha
            x_neg = shifted.mul_(self.beta)
            sp_pos = softplus(masked_logsumexp(x_pos, pos))  # log(1 + sum exp), per anchor
            sp_neg = softplus(masked_logsumexp(x_neg, neg))
            value = (sp_pos / self.alpha + sp_neg / self.beta).mean()
            if not need_grad:
                return value, None
            # d/ds_ip = -e^{x_ip} / (1 + sum_p e^{x_p}) / N; d/ds_in = e^{x_in} / (1 + sum_n e^{x_n}) / N
            log_n = math.log(s.shape[0])
            g_pos = exp_log_weights_(x_pos.sub_(sp_pos[:, None] + log_n)).neg_()
            g_neg = exp_log_weights_(x_neg.sub_(sp_neg[:, None] + log_n))
            return value, torch.where(pos, g_pos, g_neg.mul_(neg))

        return batch.cosine_loss(value_and_grad)

    def _mined_pairs_grad(self, batch: PairBatch):
        """The mined loss against ``batch.ref`` (see the class docstring): the positives as a list of
        pairs; the negatives as a list too when few are kept, else as one ``(N, M)`` mask."""
        eps, inf = self.miner_epsilon, float("inf")

        def value_and_grad(s: Tensor, need_grad: bool):
            n = s.shape[0]
            pi, pj = (batch.labels[:, None] == batch.ref_labels[None, :]).nonzero(as_tuple=True)
            if batch.ref_exclude is not None:
                keep = pj != batch.ref_exclude[pi]
                pi, pj = pi[keep], pj[keep]
            s_pos = s[pi, pj]
            # from here on s holds the negatives only: -inf at the positives and the excluded pairs
            batch.fill_excluded_(s.index_put_((pi, pj), s.new_tensor(-inf)), -inf)
            hardest_neg = s.amax(1)  # -inf: no negative
            hardest_pos = s.new_full((n,), inf).scatter_reduce_(0, pi, s_pos, "amin")
            neg = (s + eps) > hardest_pos[:, None]
            keep = s_pos - eps < hardest_neg[pi]
            pi, pj, s_pos = pi[keep], pj[keep], s_pos[keep]
            x_pos = (s_pos - self.base).mul_(-self.alpha)
            sp_pos = softplus(row_logsumexp(x_pos, pi, n))
            log_n = math.log(n)
            sparse = int(neg.count_nonzero()) <= SPARSE_FRACTION * neg.numel()
            if sparse:
                ni, nj = neg.nonzero(as_tuple=True)
                x_neg = (s[ni, nj] - self.base).mul_(self.beta)
                sp_neg = softplus(row_logsumexp(x_neg, ni, n))
            else:
                # the largest kept negative of a row is its hardest negative: the peak, without a pass
                peak = (hardest_neg - self.base).mul_(self.beta)
                peak = torch.where(torch.isinf(peak), 0.0, peak)[:, None]
                e_neg = torch.where(neg, exp_log_weights_(s.sub_(self.base).mul_(self.beta).sub_(peak)), 0.0)
                sp_neg = softplus(e_neg.sum(1, keepdim=True).log_().add_(peak)).squeeze(1)
            value = (sp_pos / self.alpha + sp_neg / self.beta).mean()
            if not need_grad:
                return value, None
            g_pos = exp_log_weights_(x_pos.sub_(sp_pos[pi] + log_n)).neg_()
            if not sparse:  # d/ds_in = e^{x_in - peak} e^{peak - sp_neg} / N
                # the exponent is <= -log N where a row kept a negative (sp_neg >= peak); elsewhere the
                # row of e_neg is 0 and the clamp keeps a large peak from making inf * 0
                grad = e_neg.mul_((peak.squeeze(1) - sp_neg - log_n).clamp_max_(0.0).exp_()[:, None])
                return value, grad.index_put_((pi, pj), g_pos)
            g_neg = exp_log_weights_(x_neg.sub_(sp_neg[ni] + log_n))
            index = torch.stack([torch.cat([pi, ni]), torch.cat([pj, nj])])
            return value, torch.sparse_coo_tensor(index, torch.cat([g_pos, g_neg]), s.shape,
                                                  check_invariants=False)

        return value_and_grad


class CircleLoss(PairLoss):
    """Circle loss, pair-wise form (Sun et al., CVPR 2020), on cosine similarity ``s``:

    ``l_i = softplus( LSE_p(-gamma a_p (s_ip - (1 - m))) + LSE_n(gamma a_n (s_in - m)) )`` with
    ``a_p = [1 + m - s_ip]_+`` and ``a_n = [s_in + m]_+`` detached. Anchors lacking a positive or a
    negative give 0; AvgNonZero over anchors. Same as PML ``CircleLoss(m, gamma)``. Paper settings:
    retrieval m=0.4, gamma=80 (default); re-ID m=0.25, gamma=128; faces m=0.25, gamma=256.
    """

    name = "circle"

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        self.m, self.gamma = float(m), float(gamma)

    def compute(self, batch: PairBatch) -> Tensor:
        valid = batch.pos.any(1) & batch.neg.any(1)
        if not valid.any():
            return self.zero(batch, "no anchor has both a positive and a negative")
        m, g = self.m, self.gamma

        def value_and_grad(s: Tensor, need_grad: bool):
            w_pos = (1.0 + m - s).clamp_min_(0.0).mul_(-g)  # -gamma a_p: slope of the pos logits
            w_neg = (s + m).clamp_min_(0.0).mul_(g)  # gamma a_n
            x_pos = w_pos * (s - (1.0 - m))
            x_neg = w_neg * (s - m)
            lse_pos = masked_logsumexp(x_pos, batch.pos)
            lse_neg = masked_logsumexp(x_neg, batch.neg)
            row = torch.where(valid, lse_pos + lse_neg, 0.0)
            value, weight = avg_nonzero(softplus(row) * valid)
            if not need_grad:
                return value, None
            coef = torch.sigmoid(row).mul_(weight)[:, None]
            g_pos = exp_log_weights_(x_pos.sub_(lse_pos[:, None])).mul_(w_pos)
            g_neg = exp_log_weights_(x_neg.sub_(lse_neg[:, None])).mul_(w_neg)
            return value, torch.where(batch.pos, g_pos, torch.where(batch.neg, g_neg, 0.0)).mul_(coef)

        return batch.cosine_loss(value_and_grad)


class SupConLoss(PairLoss):
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020), on cosine similarity ``s``:

    ``l_i = -mean_{p} [ s_ip / T - log sum_{j != i} e^{s_ij / T} ]``, AvgNonZero over anchors with a
    positive. Same value as PML ``SupConLoss(temperature)``, except that PML returns 0 when the batch
    has no negative pair at all (one class only); we still compute the formula (as the authors' code).
    """

    name = "supcon"

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = float(temperature)

    def compute(self, batch: PairBatch) -> Tensor:
        n_pos = batch.pos.sum(1)
        if not bool((n_pos > 0).any()):
            return self.zero(batch, "no positive pair")
        t = self.temperature

        def value_and_grad(s: Tensor, need_grad: bool):
            # logits of the excluded pairs (self, ref_exclude) are -inf: out of the denominator
            logits = batch.fill_excluded_(s.div(t), float("-inf"))
            # log-sum-exp by hand, keeping the exponentials: they are the softmax of the gradient
            peak = logits.amax(1, keepdim=True)
            peak = torch.where(torch.isinf(peak), 0.0, peak)  # a row with no other item
            e = (logits - peak).exp_()
            total = e.sum(1, keepdim=True)
            denom = (total.log() + peak).squeeze(1).clamp_min_(torch.finfo(s.dtype).min)
            inv_pos = 1.0 / n_pos.clamp_min(1).to(s.dtype)
            mean_pos = torch.where(batch.pos, logits, 0.0).sum(1) * inv_pos
            value, weight = avg_nonzero(torch.where(n_pos > 0, denom - mean_pos, 0.0).clamp_min_(0.0))
            if not need_grad:
                return value, None
            # d l_i / d s_ij = (softmax_{j != i}(logits)_ij - [j positive] / n_pos_i) / T
            grad = e.mul_(total.clamp_min_(torch.finfo(s.dtype).tiny).reciprocal_())
            grad.sub_(torch.where(batch.pos, inv_pos[:, None], 0.0))
            return value, grad.mul_(weight.div_(t)[:, None])

        return batch.cosine_loss(value_and_grad)


class NTXentLoss(PairLoss):
    """NT-Xent / InfoNCE (Chen et al., SimCLR, ICML 2020) with labels, on cosine similarity ``s``:

    ``l_ip = -log( e^{s_ip/T} / (e^{s_ip/T} + sum_{n of i} e^{s_in/T}) )`` for every positive pair,
    mean over positive pairs. Same value as PML ``NTXentLoss(temperature)``, but PML builds a
    (#pos pairs x #neg pairs) matrix; here each anchor's negative log-sum-exp is computed once, O(N M).
    """

    name = "ntxent"

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = float(temperature)

    def compute(self, batch: PairBatch) -> Tensor:
        if not bool((batch.pos.any(1) & batch.neg.any(1)).any()):
            return self.zero(batch, "no positive pair whose anchor also has a negative")
        n_pairs = batch.pos.sum()
        t = self.temperature

        def value_and_grad(s: Tensor, need_grad: bool):
            logits = s / t
            neg_lse = logits.masked_fill(~batch.neg, float("-inf")).logsumexp(1, keepdim=True)
            z = neg_lse - logits  # l_ip = log(1 + e^{z_ip}) = softplus(z_ip)
            value = torch.where(batch.pos, softplus(z), 0.0).sum() / n_pairs
            if not need_grad:
                return value, None
            # d l_ip / d logit_ip = -sigmoid(z_ip); d l_ip / d logit_in = sigmoid(z_ip) softmax_neg(i)_n
            sig = torch.where(batch.pos, torch.sigmoid(z), 0.0)
            weight = sig.sum(1, keepdim=True)
            grad = torch.where(batch.neg, exp_log_weights_(logits.sub_(neg_lse)).mul_(weight), 0.0).sub_(sig)
            return value, grad.div_(n_pairs.to(s.dtype) * t)

        return batch.cosine_loss(value_and_grad)


class NPairsLoss(PairLoss):
    """N-pair loss (Sohn, NeurIPS 2016).

    For each label, the first query with a positive is the anchor and its first positive (batch or
    reference order) the positive. With anchors ``a_k`` and positives ``p_k`` (one per label),
    ``L = mean_k CE(softmax_l(a_k . p_l), k) + l2_reg * 0.5 * mean_i |f_i|^2``.
    ``normalize=True`` (default) uses cosine similarities: PML ``NPairsLoss()`` exactly (PML has no
    regulariser). The Paddle SOP recipe is ``normalize=False, l2_reg=0.01`` on raw features, where the
    regulariser is over all raw batch features. Fewer than two such pairs warns and returns zero
    (plus the regulariser).
    """

    name = "npairs"

    def __init__(self, l2_reg: float = 0.0, normalize: bool = True):
        super().__init__()
        self.l2_reg, self.normalize = float(l2_reg), bool(normalize)

    def compute(self, batch: PairBatch) -> Tensor:
        reg = 0.5 * self.l2_reg * batch.query.pow(2).sum(1).mean() if self.l2_reg else 0.0
        anchors, positives = self._pairs(batch)
        if anchors.numel() < 2:
            return self.zero(batch, "fewer than two labels with a positive pair") + reg
        q = batch.query[anchors]
        p = (batch.query if batch.ref is None else batch.ref)[positives]
        if self.normalize:
            q, p = F.normalize(q, dim=1), F.normalize(p, dim=1)
        target = torch.arange(anchors.numel(), device=q.device)
        return F.cross_entropy(q @ p.T, target) + reg

    @staticmethod
    @torch.no_grad()
    def _pairs(batch: PairBatch) -> tuple[Tensor, Tensor]:
        """Per label, the first query that has a positive, and its first positive."""
        labels, n = batch.labels, batch.labels.shape[0]
        if batch.ref is None:  # first and second occurrence of each label: a stable sort, no (N, N) mask
            order = torch.argsort(labels, stable=True)
            ordered = labels[order]
            first = torch.ones(n, dtype=torch.bool, device=labels.device)
            first[1:] = ordered[1:] != ordered[:-1]
            has_second = torch.zeros_like(first)
            has_second[:-1] = ordered[1:] == ordered[:-1]
            starts = (first & has_second).nonzero().squeeze(1)
            return order[starts], order[starts + 1]
        rows = torch.arange(n, device=labels.device)
        _, inverse = torch.unique(labels, return_inverse=True)
        candidate = torch.where(batch.pos.any(1), rows, n)
        first = torch.full((int(inverse.max()) + 1,), n, device=rows.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, candidate, "amin")
        anchors = first[first < n]
        return anchors, batch.pos[anchors].to(torch.uint8).argmax(1)
