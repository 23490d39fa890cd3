"""Shared math for the loss zoo: input checks, label masks, distance and similarity matrices,
masked log-sum-exp, the AvgNonZero reduction, the warn-and-zero helper, and
:func:`similarity_loss` / :func:`eager_loss`, which let a loss supply its closed-form gradient with
respect to the similarity (or distance) matrix.

Conventions used by every loss in this package:

- ``embeddings`` are ``(N, D)`` float; half and bfloat16 inputs are upcast to float32 and autocast is
  switched off inside the loss, so the loss is computed (and returned) in float32 (float64 stays float64).
- ``labels`` are ``(N,)`` integers, compared as int64; floating-point labels are refused (float32 labels
  collide from 2**24 on).
- Pair masks, ``(N, M)`` bool. Without a reference set the rows and columns are the batch itself and the
  pair ``(i, i)`` is excluded *by index*. With ``ref_embeddings`` every (query, reference) pair counts,
  except the pair ``(i, ref_exclude[i])`` when ``ref_exclude[i] >= 0`` (used by
  :class:`~deepmetric.losses.CrossBatchMemory` to drop each query's own copy in the memory). The rule
  never depends on tensor identity.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.distances import DISTANCES  # noqa: F401  (the losses' distance choices)

EPS_SQ = 1e-12  # clamp on squared distances before sqrt, as Centroids-ReID's ``euclidean_dist``


class NoValidPairsWarning(UserWarning):
    """A loss received a batch with nothing to learn from (no positive pair, no triplet, ...).

    The loss then returns ``embeddings.sum() * 0``: zero, still attached to the graph, never NaN.
    """


def zero_loss(embeddings: Tensor, loss_name: str, detail: str) -> Tensor:
    """Warn with :class:`NoValidPairsWarning` and return a zero that keeps the autograd graph."""
    warnings.warn(
        f"{loss_name}: {detail}; returning a zero loss. Check the batch sampler "
        "(a PK sampler with K >= 2 gives every anchor a positive).",
        NoValidPairsWarning,
        stacklevel=3,
    )
    return embeddings.sum() * 0


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs, float64 if any input is float64."""
    out = torch.float32
    for t in tensors:
        if t.dtype == torch.float64:
            out = torch.float64
    return out


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast on ``device`` so matmuls and exps run in the dtype we chose."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device types without autocast support
        return contextlib.nullcontext()


def check_embeddings(x: Tensor, what: str = "embeddings") -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a 2-D float tensor (N, D); got {shape}")


def check_labels(labels: Tensor, n: int, device: torch.device, what: str = "labels") -> Tensor:
    """Return ``labels`` as int64 on ``device``; refuse floats, bools, wrong shapes."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of int64 class ids; got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{what} must be an integer tensor (int64), got {labels.dtype}: float labels collide "
            "beyond 2**24, cast your ids with .long() at the source"
        )
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},); got {tuple(labels.shape)}")
    return labels.to(device=device, dtype=torch.int64)


def label_masks(
    labels: Tensor, ref_labels: Optional[Tensor] = None, ref_exclude: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Positive and negative pair masks, ``(N, M)`` bool each.

    ``ref_labels=None`` compares the batch with itself and drops the diagonal; otherwise column ``j`` is
    reference item ``j`` and only ``(i, ref_exclude[i])`` is dropped (``-1`` drops nothing).
    """
    ref = labels if ref_labels is None else ref_labels
    pos = labels[:, None] == ref[None, :]
    neg = ~pos
    if ref_labels is None:
        pos.fill_diagonal_(False)  # the diagonal is already False in neg
    elif ref_exclude is not None:
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None]
        cols = ref_exclude.clamp_min(0)[:, None]
        drop = ref_exclude[:, None] >= 0
        for mask in (pos, neg):  # index-free so it never syncs with the device
            mask[rows, cols] = mask[rows, cols] & ~drop
    return pos, neg


class _Gram(torch.autograd.Function):
    """``x @ x.T`` whose backward is one matmul, ``(G + G.T) @ x``, instead of two."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x @ x.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return (grad + grad.T) @ x


def dot_matrix(query: Tensor, ref: Optional[Tensor] = None) -> Tensor:
    """``(N, M)`` dot products; ``ref=None`` means the query set itself (symmetric, cheaper backward)."""
    if ref is None:
        return _Gram.apply(query)
    return query @ ref.T


def squared_distance_matrix(query: Tensor, ref: Optional[Tensor] = None, unit: bool = False) -> Tensor:
    """``(N, M)`` squared Euclidean distances ``|q|^2 + |r|^2 - 2 q.r``, clamped at 0.

    ``unit=True`` asserts rows are L2-normalised and uses ``2 - 2 q.r``.
    """
    dots = dot_matrix(query, ref)
    if unit:
        sq = 2.0 - 2.0 * dots
    else:
        qq = query.pow(2).sum(1)
        rr = qq if ref is None else ref.pow(2).sum(1)
        sq = qq[:, None] + rr[None, :] - 2.0 * dots
    return sq.clamp_min(0.0)


def distance_matrix(query: Tensor, ref: Optional[Tensor], kind: str, unit: bool) -> Tensor:
    """Distances of one ``kind``: ``euclidean`` (sqrt of squared distance clamped at 1e-12),
    ``squared_euclidean``, or ``cosine`` (``1 - cos``, inputs must be unit vectors)."""
    if kind == "cosine":
        return 1.0 - dot_matrix(query, ref)
    sq = squared_distance_matrix(query, ref, unit=unit)
    if kind == "squared_euclidean":
        return sq
    return sq.clamp_min(EPS_SQ).sqrt()


def unit_distances(sim: Tensor, kind: str) -> Tensor:
    """Distances between unit vectors from their cosine similarities (no autograd needed):
    ``euclidean`` = ``sqrt(max(2 - 2s, 1e-12))``, ``squared_euclidean`` = ``max(2 - 2s, 0)``,
    ``cosine`` = ``1 - s``. Same values as :func:`distance_matrix` with ``unit=True``."""
    if kind == "cosine":
        return torch.rsub(sim, 1.0)
    sq = torch.rsub(sim, 2.0, alpha=2.0)  # 2 - 2 s in one pass
    return sq.clamp_min_(0.0) if kind == "squared_euclidean" else sq.clamp_min_(EPS_SQ).sqrt_()


def chain_unit_distance_(grad: Tensor, dist: Tensor, kind: str) -> Tensor:
    """Turn ``grad`` (d loss / d dist) into d loss / d sim, in place, for :func:`unit_distances`:
    slope ``-1/d`` (euclidean), ``-2`` (squared), ``-1`` (cosine); 0 where a clamp is active
    (coincident points), as autograd through the clamps gives."""
    if kind == "cosine":
        return grad.neg_()
    if kind == "squared_euclidean":
        return grad.mul_(-2.0).masked_fill_(dist <= 0.0, 0.0)
    return grad.div_(dist).neg_().masked_fill_(dist <= EPS_SQ ** 0.5, 0.0)


GradFn = Callable[[Tensor, bool], tuple[Tensor, Optional[Tensor]]]


class _EagerLoss(torch.autograd.Function):
    """A scalar loss of one matrix whose gradient the loss computes together with its value."""

    @staticmethod
    def forward(ctx, mat: Tensor, fn: GradFn) -> Tensor:  # type: ignore[override]
        value, grad = fn(mat.detach(), True)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * upstream, None


def eager_loss(mat: Tensor, fn: GradFn) -> Tensor:
    """Apply ``fn(mat, need_grad) -> (value, d value / d mat)`` as an autograd node on a matrix that
    keeps its own history (e.g. raw distances). Double backward is not supported."""
    if torch.is_grad_enabled() and mat.requires_grad:
        return _EagerLoss.apply(mat, fn)
    return fn(mat.detach(), False)[0]


SPARSE_FRACTION = 1 / 32  # below this share of non-zero gradient entries, backward skips the matmul


def _unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``F.normalize(x, dim=1)`` (eps 1e-12) without autograd, and the inverse norms ``(N, 1)``."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    inv = norm.clamp_min_(1e-12).reciprocal_()
    return x * inv, inv


def _through_normalize(grad: Tensor, unit: Tensor, inv: Tensor) -> Tensor:
    """Chain ``grad`` (w.r.t. the unit rows) through ``F.normalize``: ``(g - u <u, g>) / |x|``;
    rows whose norm was clamped at 1e-12 (``|u| < 1``) are a plain division, as in autograd."""
    along = torch.linalg.vecdot(unit, grad, dim=1)[:, None]
    along.mul_(inv < 1e12)
    return grad.sub_(unit * along).mul_(inv)


class _SimilarityLoss(torch.autograd.Function):
    """A scalar loss of the cosine matrix ``S = unit(query) @ unit(ref).T`` (``ref=None``: the query
    itself) whose gradient with respect to ``S`` the loss computes in closed form with its value."""

    @staticmethod
    def forward(ctx, query: Tensor, ref: Optional[Tensor], fn: GradFn) -> Tensor:  # type: ignore[override]
        q, q_inv = _unit_rows(query)
        r, r_inv = (q, q_inv) if ref is None else _unit_rows(ref)
        value, grad = fn(q @ r.T, True)
        ctx.same = ref is None
        ctx.save_for_backward(q, q_inv, r, r_inv, grad)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream: Tensor):  # type: ignore[override]
        q, q_inv, r, r_inv, grad = ctx.saved_tensors
        same, want_ref = ctx.same, not ctx.same and ctx.needs_input_grad[1]
        if grad.is_sparse and grad._nnz() > SPARSE_FRACTION * grad.numel():
            grad = grad.to_dense()  # a loss that mined its pairs sparsely, but kept many of them
        if grad.is_sparse or int(grad.count_nonzero()) <= SPARSE_FRACTION * grad.numel():
            # few active pairs (batch-hard, margin losses): a sparse product instead of a dense one
            sparse = grad.coalesce() if grad.is_sparse else grad.to_sparse()
            grad_q = torch.sparse.mm(sparse, r)
            if same:
                grad_q += torch.sparse.mm(sparse.t(), q)
            grad_r = torch.sparse.mm(sparse.t(), q) if want_ref else None
        else:
            # (G + G^T) q: a contiguous copy of G^T plus G, not `grad + grad.T`, whose strided reads miss
            # the cache (benchmarks/bench_losses.py times the losses this serves)
            grad_q = grad.T.clone(memory_format=torch.contiguous_format).add_(grad) @ q if same else grad @ r
            grad_r = grad.T @ q if want_ref else None
        grad_q = _through_normalize(grad_q, q, q_inv).mul_(upstream)
        if grad_r is not None:
            grad_r = _through_normalize(grad_r, r, r_inv).mul_(upstream)
        return grad_q, grad_r, None


def similarity_loss(query: Tensor, ref: Optional[Tensor], fn: GradFn) -> Tensor:
    """Apply ``fn(S, need_grad) -> (value, d value / d S)`` to the cosine matrix of ``query`` and
    ``ref`` (rows L2-normalised here; ``ref=None`` means the query set itself), as one autograd node.
    ``S`` is a fresh tensor that ``fn`` may overwrite; ``d value / d S`` may be a sparse COO tensor.

    The hot pair losses write their gradient with respect to the similarity matrix in closed form:
    a few fused passes instead of the dozen (N, M) tensors autograd would keep and replay. Backward
    is one matmul, or a sparse gather when few pairs are active, then the normalisation's Jacobian.
    Double backward is not supported.
    """
    needs = torch.is_grad_enabled() and (query.requires_grad or (ref is not None and ref.requires_grad))
    if needs:
        return _SimilarityLoss.apply(query, ref, fn)
    with torch.no_grad():
        q = _unit_rows(query)[0]
        return fn(q @ (q if ref is None else _unit_rows(ref)[0]).T, False)[0]


def check_choice(loss_name: str, param: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"loss '{loss_name}': {param}={value!r} is not one of {', '.join(choices)}")
    return value


EXP_FLOOR = -80.0  # exp(-80) ~ 2e-35: below it an exp adds nothing, and x86 exp is slow there


def exp_log_weights_(x: Tensor) -> Tensor:
    """In place ``exp(x)`` for log-weights that are <= 0 where they matter (``x - logsumexp``).

    Clamps to ``[-80, 0]`` first: entries that are outside a mask (and discarded afterwards) may hold
    anything, and exps of very negative numbers or of denormal results take a slow path on CPUs.
    """
    return x.clamp_(EXP_FLOOR, 0.0).exp_()


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """log-sum-exp over the entries where ``mask`` is True; ``-inf`` for a row with no entry.

    Terms below ``e^-80`` of the row maximum are dropped (relative effect < 1e-30).
    """
    peak = x.masked_fill(~mask, float("-inf")).amax(dim, keepdim=True)
    peak = torch.where(torch.isinf(peak), 0.0, peak)
    total = exp_log_weights_(x - peak).mul_(mask).sum(dim, keepdim=True)
    return (total.log_() + peak).squeeze(dim)


def row_logsumexp(x: Tensor, rows: Tensor, n: int) -> Tensor:
    """:func:`masked_logsumexp` of a sparse matrix given as its entries ``x`` (K,) and their row
    indices ``rows`` (K,): ``(n,)``, ``-inf`` for a row with no entry, the same e^-80 floor."""
    peak = x.new_full((n,), float("-inf")).scatter_reduce_(0, rows, x, "amax")
    peak = torch.where(torch.isinf(peak), 0.0, peak)
    total = x.new_zeros(n).index_add_(0, rows, exp_log_weights_(x - peak[rows]))
    return total.log_() + peak


def softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)`` without ``F.softplus``'s linear cut-over at x > 20 (exact in float64 too)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def avg_nonzero(terms: Tensor) -> tuple[Tensor, Tensor]:
    """PML's ``AvgNonZeroReducer`` on non-negative ``terms``: the mean over the entries > 0 (0 if
    none), and its gradient with respect to ``terms``, ``[term > 0] / count``. Sync-free."""
    active = terms > 0
    count = active.sum().clamp_min(1).to(terms.dtype)
    return terms.sum() / count, active.to(terms.dtype).div_(count)


REDUCTIONS = ("nonzero", "mean")


def reduce_terms(terms: Tensor, counted: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """Reduce hinge terms ``[v]_+`` (zero where not ``counted``) to a scalar: ``nonzero`` = the mean
    over the terms > 0 (:func:`avg_nonzero`); ``mean`` = the mean over every counted entry, zero terms
    included (0 if none). Also returns the gradient with respect to the hinge inputs ``v``:
    ``[term > 0] / count`` (a zero term passes no gradient, whatever the reduction). Sync-free."""
    if reduction == "nonzero":
        return avg_nonzero(terms)
    count = counted.sum().clamp_min(1).to(terms.dtype)
    return terms.sum() / count, (terms > 0).to(terms.dtype).div_(count)


class PairBatch:
    """One call of a pair loss, checked and cast: what every pair loss computes from.

    ``pos`` / ``neg`` (``(N, M)`` bool, see :func:`label_masks`) are built on first use.
    """

    def __init__(self, embeddings: Tensor, query: Tensor, ref: Optional[Tensor], labels: Tensor,
                 ref_labels: Tensor, ref_exclude: Optional[Tensor]):
        self.embeddings = embeddings  # the caller's tensor, for a graph-preserving zero
        self.query = query  # (N, D) in the compute dtype
        self.ref = ref  # (M, D), or None for "the batch itself"
        self.labels = labels  # (N,) int64
        self.ref_labels = ref_labels  # (M,) int64 (the batch labels when ref is None)
        self.ref_exclude = ref_exclude  # (N,) int64 or None

    @functools.cached_property
    def _masks(self) -> tuple[Tensor, Tensor]:
        if self.ref is None:
            return label_masks(self.labels)
        return label_masks(self.labels, self.ref_labels, self.ref_exclude)

    @property
    def pos(self) -> Tensor:
        return self._masks[0]

    @property
    def neg(self) -> Tensor:
        return self._masks[1]

    def fill_excluded_(self, mat: Tensor, value: float) -> Tensor:
        """Write ``value`` in place at the excluded pairs of an ``(N, M)`` matrix: the diagonal
        without a reference, ``(i, ref_exclude[i])`` with one. O(N), no mask needed."""
        if self.ref is None:
            return mat.fill_diagonal_(value)
        if self.ref_exclude is not None:
            rows = torch.arange(mat.shape[0], device=mat.device)
            cols = self.ref_exclude.clamp_min(0)
            mat[rows, cols] = torch.where(self.ref_exclude >= 0, value, mat[rows, cols])
        return mat

    def normalized(self) -> tuple[Tensor, Optional[Tensor]]:
        q = F.normalize(self.query, dim=1)
        r = None if self.ref is None else F.normalize(self.ref, dim=1)
        return q, r

    def has_pairs(self) -> bool:
        """Whether any (query, reference) pair is left after the self / ``ref_exclude`` rule."""
        if self.ref is None:
            return self.labels.shape[0] >= 2
        m = self.ref.shape[0]
        if m >= 2 or (m == 1 and self.ref_exclude is None):
            return m * self.labels.shape[0] > 0  # each query excludes at most one item
        return m == 1 and bool((self.ref_exclude != 0).any())

    def cosine_loss(self, fn: GradFn) -> Tensor:
        """:func:`similarity_loss` of the batch against the reference: ``fn`` sees cosines."""
        return similarity_loss(self.query, self.ref, fn)

    def distances(self, kind: str = "euclidean", normalize: bool = True) -> Tensor:
        q, r = self.normalized() if normalize else (self.query, self.ref)
        return distance_matrix(q, r, kind, unit=normalize)


def pair_batch(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    ref_exclude: Optional[Tensor] = None,
) -> PairBatch:
    """Check a pair-loss call and build its masks (see the module docstring for the rules)."""
    check_embeddings(embeddings)
    device = embeddings.device
    labels = check_labels(labels, embeddings.shape[0], device)
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("pass ref_embeddings and ref_labels together (or neither)")
    if ref_embeddings is None:
        if ref_exclude is not None:
            raise ValueError("ref_exclude indexes into ref_embeddings; it needs ref_embeddings")
        return PairBatch(embeddings, embeddings.to(compute_dtype(embeddings)), None, labels, labels, None)
    check_embeddings(ref_embeddings, "ref_embeddings")
    if ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings has dimension {ref_embeddings.shape[1]}, embeddings {embeddings.shape[1]}"
        )
    ref_labels = check_labels(ref_labels, ref_embeddings.shape[0], device, "ref_labels")
    if ref_exclude is not None:
        ref_exclude = check_labels(ref_exclude, embeddings.shape[0], device, "ref_exclude")
    dtype = compute_dtype(embeddings, ref_embeddings)
    ref = ref_embeddings.to(device=device, dtype=dtype)
    return PairBatch(embeddings, embeddings.to(dtype), ref, labels, ref_labels, ref_exclude)
