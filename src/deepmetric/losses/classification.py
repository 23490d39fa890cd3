"""Classification-style losses: each owns a class matrix ``weight`` of shape
``(num_classes, embedding_dim)`` (class centres / proxies / classifier rows) and is called
``loss(embeddings, labels)``. Logits are computed in float32 (float64 if the module is double) with
autocast off, so half-precision training cannot overflow the scaled logits.

Margins are in radians. PML stores the same matrices transposed, ``(embedding_dim, num_classes)``:
``pml_loss.W.data = ours.weight.T`` makes the two compute the same thing (``proxies`` for proxy-anchor
has our layout already).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Loss
from .functional import autocast_off, check_embeddings, check_labels, compute_dtype, softplus


class _CosineLogits(torch.autograd.Function):
    """``scale * cos(x_n, w_c)`` for unit rows ``x`` (N, D) and raw class rows ``w`` (C * k, D); with
    ``k > 1`` sub-centres per class (rows ``c*k .. c*k+k-1``), the max over each class's sub-centres.

    Equivalent to ``scale * x @ normalize(w).T`` (then ``.view(N, C, k).amax(2)``) but never
    materialises the normalised weights nor the (N, C * k) scores: the row norms scale the (N, C)
    result, sub-centres are visited one at a time with a running max, and the weight gradient is
    ``A - (|w|^-2 <A, w>) w`` with ``A = (G scale / |w|)^T x``: one matmul and one fused pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: float, k: int) -> Tensor:  # type: ignore[override]
        norm = torch.linalg.vector_norm(weight, dim=1)
        inv = 1.0 / norm.clamp_min(1e-12)  # as F.normalize(eps=1e-12)
        ctx.scale, ctx.k = scale, k
        if k == 1:
            ctx.save_for_backward(x, weight, inv, norm > 1e-12, None)
            return (x @ weight.T).mul_(inv * scale)
        w, inv = weight.view(-1, k, weight.shape[1]), inv.view(-1, k)
        best = (x @ w[:, 0].T).mul_(inv[:, 0] * scale)
        which = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
        for j in range(1, k):  # ties keep the first sub-centre, like torch.max
            score = (x @ w[:, j].T).mul_(inv[:, j] * scale)
            better = score > best
            best = torch.where(better, score, best)
            which.masked_fill_(better, j)
        ctx.save_for_backward(x, weight, inv.view(-1), norm > 1e-12, which)
        return best

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, inv, unclamped, which = ctx.saved_tensors
        k, d = ctx.k, weight.shape[1]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None
        w3, inv2, ok2 = weight.view(-1, k, d), inv.view(-1, k), unclamped.view(-1, k)
        for j in range(k):  # one sub-centre at a time (k = 1: the whole matrix, no copies)
            g = grad if k == 1 else torch.where(which == j, grad, 0.0)
            g = g * (inv2[:, j] * ctx.scale)
            if grad_x is not None:
                grad_x.addmm_(g, w3[:, j])
            if ctx.needs_input_grad[1]:
                a = g.T @ x
                coef = torch.linalg.vecdot(a, w3[:, j], dim=1) * inv2[:, j] * inv2[:, j] * ok2[:, j]
                a.addcmul_(w3[:, j], coef[:, None], value=-1.0)
                if k == 1:
                    grad_w = a
                else:
                    grad_w = torch.empty_like(weight) if grad_w is None else grad_w
                    grad_w.view(-1, k, d)[:, j] = a
        return grad_x, grad_w, None, None


class ClassificationLoss(Loss):
    """Base class: owns ``weight`` (rows, embedding_dim), checks inputs, computes in full precision."""

    kind = "classification"
    name = "classification"

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        for key, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"loss '{self.name}': {key} must be a positive int, got {value!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``embeddings`` (N, D) float, ``labels`` (N,) int64 in ``[0, num_classes)``; 0-dim result."""
        check_embeddings(embeddings)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"loss '{self.name}' was built for embedding_dim={self.embedding_dim}, "
                f"got embeddings of dimension {embeddings.shape[1]}"
            )
        labels = check_labels(labels, embeddings.shape[0], embeddings.device)
        dtype = compute_dtype(embeddings, self.weight)
        with autocast_off(embeddings.device):
            return self.compute(embeddings.to(dtype), labels, self.weight.to(dtype))

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def cosine(self, x: Tensor, weight: Tensor, scale: float = 1.0, sub_centers: int = 1) -> Tensor:
        """``(N, C)`` ``scale`` times the cosines between embeddings and class rows (the best of
        each class's ``sub_centers`` rows)."""
        return _CosineLogits.apply(F.normalize(x, dim=1), weight, float(scale), sub_centers)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"


def _positive(loss: str, key: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"loss '{loss}': {key} must be > 0, got {value!r}")
    return float(value)


class SoftmaxLoss(ClassificationLoss):
    """Linear classifier + cross-entropy: ``CE(x W^T + b, y)``, mean over the batch, optional label
    smoothing. Paddle's SOP pretraining uses an fc *with* bias (``bias=True``, default) initialised
    Uniform(+-1/sqrt(D)); Centroids-ReID's BNNeck classifier has none (``bias=False``).
    """

    name = "softmax"

    def __init__(self, num_classes: int, embedding_dim: int, label_smoothing: float = 0.0,
                 bias: bool = True):
        super().__init__(num_classes, embedding_dim)
        bound = 1.0 / math.sqrt(embedding_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound)) if bias else None
        self.label_smoothing = float(label_smoothing)

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        logits = F.linear(x, weight, bias)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class NormalizedSoftmaxLoss(ClassificationLoss):
    """Normalised softmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning",
    BMVC 2019): ``CE(cos(x, W_c) / temperature, y)``, mean. Same as PML ``NormalizedSoftmaxLoss``."""

    name = "normalized_softmax"

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05):
        super().__init__(num_classes, embedding_dim)
        nn.init.xavier_uniform_(self.weight)
        self.temperature = _positive(self.name, "temperature", temperature)

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        return F.cross_entropy(self.cosine(x, weight, 1.0 / self.temperature), labels)


def arc_margin(cos_target: Tensor, margin: float, easy_margin: bool) -> Tensor:
    """Target logit of ArcFace in the insightface/Paddle form: ``phi = cos(theta + m)`` computed as
    ``cos m cos - sin m sin``; ``easy_margin``: ``phi`` only where ``cos > 0``; otherwise, past
    ``theta > pi - m`` (``cos <= cos(pi - m)``) use ``cos - sin(pi - m) m`` = ``cos - m sin m``,
    which is exactly PML's fallback ``cos(theta) - m sin(m)``, so both forms agree everywhere."""
    sin = (1.0 - cos_target * cos_target).clamp_min(1e-12).sqrt()
    phi = cos_target * math.cos(margin) - sin * math.sin(margin)
    if easy_margin:
        return torch.where(cos_target > 0, phi, cos_target)
    th, mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    return torch.where(cos_target > th, phi, cos_target - mm)


class ArcFaceLoss(ClassificationLoss):
    """Additive angular margin (ArcFace, Deng et al., CVPR 2019; Paddle ``ArcMarginLoss``):
    ``CE(scale * [cos(theta_y + m) for the target, cos(theta_c) otherwise], y)``, mean, with the
    fallback of :func:`arc_margin`. ``margin`` in radians (PML takes degrees:
    ``ArcFaceLoss(margin=math.degrees(m))`` matches us). Paddle SOP recipe: scale 80, margin 0.15."""

    name = "arcface"

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0,
                 margin: float = 0.5, easy_margin: bool = False):
        super().__init__(num_classes, embedding_dim)
        nn.init.xavier_uniform_(self.weight)
        self.scale = _positive(self.name, "scale", scale)
        self.margin, self.easy_margin = float(margin), bool(easy_margin)
        self.sub_centers = 1

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        logits = self.cosine(x, weight, self.scale, self.sub_centers)
        target = arc_margin(logits.gather(1, labels[:, None]) / self.scale, self.margin, self.easy_margin)
        return F.cross_entropy(logits.scatter(1, labels[:, None], target * self.scale), labels)


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace (Deng et al., ECCV 2020): ``sub_centers`` rows per class, the class cosine is
    the max over them, then ArcFace. ``weight`` is ``(num_classes * sub_centers, embedding_dim)``,
    class-major (rows ``c*k .. c*k+k-1`` belong to class c), the transpose of PML's ``W``."""

    name = "subcenter_arcface"

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0,
                 margin: float = 0.5, sub_centers: int = 3, easy_margin: bool = False):
        super().__init__(num_classes, embedding_dim, scale, margin, easy_margin)
        if not isinstance(sub_centers, int) or sub_centers < 1:
            raise ValueError(f"loss '{self.name}': sub_centers must be a positive int, got {sub_centers!r}")
        self.sub_centers = sub_centers
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, embedding_dim))
        nn.init.xavier_uniform_(self.weight)


class CosFaceLoss(ClassificationLoss):
    """Large-margin cosine loss (CosFace, Wang et al., CVPR 2018; AM-softmax):
    ``CE(scale * (cos - margin * onehot), y)``, mean. Same as PML ``CosFaceLoss``."""

    name = "cosface"

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.35):
        super().__init__(num_classes, embedding_dim)
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = _positive(self.name, "scale", scale), float(margin)

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        logits = self.cosine(x, weight, self.scale)
        target = logits.gather(1, labels[:, None]) - self.margin * self.scale
        return F.cross_entropy(logits.scatter(1, labels[:, None], target), labels)


class CircleClassLoss(ClassificationLoss):
    """Circle loss, class-level form (Sun et al., CVPR 2020; fast-reid ``CircleSoftmax``, PaddleClas
    ``CircleMargin``): with ``s = cos(x, W_c)``,
    ``logit_y = gamma a_p (s_y - (1 - m))``, ``logit_c = gamma a_n (s_c - m)`` for c != y,
    ``a_p = [1 + m - s_y]_+``, ``a_n = [s_c + m]_+`` (detached); ``CE(logits, y)``, mean.
    Paper face setting m=0.25, gamma=256 (default). PML has only the pair form."""

    name = "circle_class"

    def __init__(self, num_classes: int, embedding_dim: int, m: float = 0.25, gamma: float = 256.0):
        super().__init__(num_classes, embedding_dim)
        nn.init.xavier_uniform_(self.weight)
        self.m, self.gamma = float(m), float(gamma)

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        s = self.cosine(x, weight)
        m, g = self.m, self.gamma
        logits = g * F.relu(s.detach() + m) * (s - m)
        s_y = s.gather(1, labels[:, None])
        target = g * F.relu(1.0 + m - s_y.detach()) * (s_y - (1.0 - m))
        return F.cross_entropy(logits.scatter(1, labels[:, None], target), labels)


class ProxyAnchorLoss(ClassificationLoss):
    """Proxy-anchor loss (Kim et al., CVPR 2020); ``weight`` holds the proxies. With ``s = cos(x, p_c)``:

    ``L = 1/|C+| sum_{c in C+} log(1 + sum_{i: y_i = c} e^{-alpha (s_ic - margin)})
    + 1/C sum_c log(1 + sum_{i: y_i != c} e^{alpha (s_ic + margin)})``, C+ = classes in the batch.
    Same as PML ``ProxyAnchorLoss`` (``proxies`` has our layout). The positive term is computed per
    batch sample (O(N)), not on an (N, C) mask.
    """

    name = "proxy_anchor"

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__(num_classes, embedding_dim)
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.margin, self.alpha = float(margin), _positive(self.name, "alpha", alpha)

    def compute(self, x: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        scaled = self.cosine(x, weight, self.alpha)  # alpha * s
        lowest = torch.finfo(scaled.dtype).min
        neg = (scaled + self.alpha * self.margin).scatter_(1, labels[:, None], lowest)
        neg_term = softplus(neg.logsumexp(0)).sum() / self.num_classes
        v = self.alpha * self.margin - scaled.gather(1, labels[:, None]).squeeze(1)
        classes, inverse = torch.unique(labels, return_inverse=True)
        peak = torch.full_like(classes, 0, dtype=v.dtype).scatter_reduce(
            0, inverse, v.detach(), "amax", include_self=False)
        sums = torch.zeros_like(peak).index_add(0, inverse, (v - peak[inverse]).exp())
        pos_term = softplus(peak + sums.log()).sum() / classes.numel()
        return pos_term + neg_term
