"""Partial FC: an ArcFace/CosFace softmax head whose class centres are sharded across ranks.

An, Zhu et al., "Partial FC: Training 10 Million Identities on a Single Machine" (ICCVW 2021) and
insightface ``arcface_torch/partial_fc_v2.py``. With ``C`` classes and ``W`` ranks, rank ``r`` owns
the contiguous block of centres ``[class_start, class_start + num_local)`` (the first ``C % W``
ranks hold one extra). Per step:

1. embeddings ``x`` ``(B_r, D)`` and labels ``(B_r,)`` of every rank are all-gathered into the
   global batch ``(B, D)``, ``B = sum_r B_r`` (embeddings with gradient);
2. each rank keeps the centres of the global batch's classes that it owns (positives) plus
   random other own centres up to ``max(1, int(sample_rate * num_local))`` in all, and remaps the
   labels into that sampled index space (``sample_rate=1`` keeps every centre);
3. local logits ``s * cos(x_i, w_j)`` ``(B, S_r)`` in fp32, with the margin on the target logit:
   ArcFace ``cos(theta + m)``, falling back to ``cos(theta) - m * sin(m)`` where
   ``theta > pi - m`` (insightface / PML), or CosFace ``cos(theta) - m``;
4. softmax cross-entropy over the union of all ranks' logits, from three all-reduces per row
   (max, sum of exponentials, target logit): no rank ever holds a ``(B, C)`` matrix.

The loss is the mean over the ``B`` global rows of ``-log softmax(target)`` and has the same value
on every rank. With ``sample_rate=1`` it equals the ordinary full-softmax head on the gathered
batch, in value and gradient.

Gradients under DDP. Rank ``r``'s centre shard receives ``dL / dW_r`` exactly; keep the module
*outside* the DDP wrapper (its parameters differ per rank and must not be averaged). The local
embeddings receive ``W * dL / dx_r`` (``compensate_ddp_average=True``), so that DDP's averaging of
the backbone's gradients yields exactly ``dL / d(theta)`` of one process training on the global
batch, consistent with the pair-loss rule in :mod:`deepmetric.core.distributed`. Pass
``compensate_ddp_average=False`` for the plain partial derivative (backbone gradients summed
rather than averaged across ranks). Centres left out of a step's sample get no gradient (zero);
an optimizer with momentum or weight decay still moves them, as in insightface's PFC v2.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from ..core.distributed import all_gather_with_grad, get_rank, get_world_size
from .base import Loss
from .classification import arc_margin

__all__ = ["PartialFC", "shard_classes", "margin_target_logit", "distributed_softmax_cross_entropy"]

def shard_classes(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """``(class_start, num_local)`` of rank ``rank``: contiguous blocks, the first ``C % W`` larger."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def margin_target_logit(cos_t: torch.Tensor, margin_type: str, margin: float) -> torch.Tensor:
    """The target class's cosine after the additive margin (before the scale): the loss zoo's
    :func:`~deepmetric.losses.classification.arc_margin` for ``arcface`` (``cos(theta + m)`` where
    ``theta <= pi - m``, else ``cos(theta) - m * sin(m)``; ``m`` in radians), ``cos(theta) - m`` for
    ``cosface``."""
    if margin_type == "cosface":
        return cos_t - margin
    return arc_margin(cos_t, margin, easy_margin=False)


class _DistSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy over rows whose columns are split across ranks.

    ``logits`` ``(B, S_r)`` fp32 holds this rank's columns; ``labels`` ``(B,)`` gives the target
    column on the rank that owns it and ``-1`` elsewhere (each row owned by exactly one rank).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, group: Any, world: int):  # type: ignore[override]
        rows = logits.shape[0]
        row_max = logits.max(dim=1).values
        if world > 1:
            tdist.all_reduce(row_max, op=tdist.ReduceOp.MAX, group=group)
        probs = (logits - row_max[:, None]).exp_()
        sum_exp = probs.sum(dim=1)
        owned = torch.nonzero(labels >= 0).squeeze(1)
        target = torch.zeros(rows, dtype=logits.dtype, device=logits.device)
        target[owned] = logits[owned, labels[owned]]
        if world > 1:
            tdist.all_reduce(sum_exp, op=tdist.ReduceOp.SUM, group=group)
            tdist.all_reduce(target, op=tdist.ReduceOp.SUM, group=group)
        loss = (row_max + sum_exp.log() - target).mean()
        probs.div_(sum_exp[:, None])
        ctx.save_for_backward(probs, owned, labels)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        probs, owned, labels = ctx.saved_tensors
        grad = probs.clone()
        grad[owned, labels[owned]] -= 1.0
        grad.mul_(grad_out / probs.shape[0])
        return grad, None, None, None


def distributed_softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group: Any = None
) -> torch.Tensor:
    """Mean softmax cross-entropy of ``(B, S_r)`` column shards; see :class:`_DistSoftmaxCE`."""
    return _DistSoftmaxCE.apply(logits, labels, group, get_world_size(group))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


class PartialFC(Loss):
    """Sharded ArcFace/CosFace head; call ``loss = pfc(embeddings, labels)`` with this rank's batch.

    Args:
        num_classes: ``C``, the total number of identities over all ranks (``C >= world size``).
        embedding_dim: ``D``.
        margin_type: ``"arcface"`` (additive angular margin) or ``"cosface"`` (additive cosine).
        scale: ``s``, the logit scale.
        margin: ``m``, radians for arcface, a cosine offset for cosface.
        sample_rate: fraction of each rank's centres used per step (positives always kept).
        dist: process group; ``None`` = the default group if initialised, else one process.
        compensate_ddp_average: multiply the embeddings' gradient by the world size so DDP's
            gradient averaging gives the one-process gradient (see the module docstring).

    ``forward(embeddings (B_r, D) float, labels (B_r,) int64) -> scalar`` (the global-batch mean).
    Every rank must call it each step, with any ``B_r``. ``weight`` is this rank's shard
    ``(num_local, D)``; ``last_step`` describes the latest call (shapes, sampled classes).
    """

    kind = "classification"
    gathers_inputs = True  # all-gathers embeddings and labels itself: give it this rank's batch

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin_type: str = "arcface",
        scale: float = 64.0,
        margin: float = 0.5,
        sample_rate: float = 1.0,
        dist: Any = None,
        compensate_ddp_average: bool = True,
    ) -> None:
        super().__init__()
        if margin_type not in ("arcface", "cosface"):
            raise ValueError(f"PartialFC margin_type must be 'arcface' or 'cosface', got {margin_type!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC sample_rate must be in (0, 1], got {sample_rate}")
        if margin < 0:
            raise ValueError(f"PartialFC margin must be >= 0, got {margin}")
        self.group = dist
        self.rank = get_rank(dist)
        self.world_size = get_world_size(dist)
        if num_classes < self.world_size:
            raise ValueError(
                f"PartialFC needs at least one class per rank: num_classes={num_classes} < "
                f"world size {self.world_size}"
            )
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.margin_type = margin_type
        self.scale = float(scale)
        self.margin = float(margin)
        self.sample_rate = float(sample_rate)
        self.compensate_ddp_average = compensate_ddp_average
        self.class_start, self.num_local = shard_classes(num_classes, self.world_size, self.rank)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_dim))
        self.last_step: Dict[str, Any] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)  # insightface's initialisation

    @property
    def shard(self) -> slice:
        """This rank's rows of the full ``(num_classes, D)`` centre matrix."""
        return slice(self.class_start, self.class_start + self.num_local)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copy this rank's block out of a full ``(num_classes, D)`` centre matrix."""
        if tuple(full.shape) != (self.num_classes, self.embedding_dim):
            raise ValueError(
                f"PartialFC.load_full_weight expects ({self.num_classes}, {self.embedding_dim}), "
                f"got {tuple(full.shape)}"
            )
        self.weight.copy_(full[self.shard])

    @torch.no_grad()
    def _sample(self, local_labels: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """Sorted local indices of the sampled centres; remaps ``local_labels[owned]`` in place."""
        positive = torch.unique(local_labels[owned], sorted=True)
        if self.num_sample > positive.numel():
            score = torch.rand(self.num_local, device=self.weight.device)
            score[positive] = 2.0  # above any uniform draw: positives are always picked
            index = torch.topk(score, k=self.num_sample).indices.sort().values
        else:
            index = positive
        local_labels[owned] = torch.searchsorted(index, local_labels[owned])
        return index

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"PartialFC expects embeddings of shape (B, {self.embedding_dim}), got {tuple(embeddings.shape)}"
            )
        labels = labels.reshape(-1)
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"PartialFC: {embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        if labels.is_floating_point():
            raise TypeError("PartialFC labels must be integer class ids (int64), not floats")
        if self.compensate_ddp_average and self.world_size > 1:
            embeddings = _ScaleGrad.apply(embeddings, float(self.world_size))
        x = all_gather_with_grad(embeddings, self.group)
        y = all_gather_with_grad(labels.long().detach(), self.group)
        if bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"PartialFC labels must lie in [0, {self.num_classes}); got {y.min()}..{y.max()}")

        local_labels = y - self.class_start
        owned = (local_labels >= 0) & (local_labels < self.num_local)
        local_labels[~owned] = -1
        if self.sample_rate < 1.0:
            index = self._sample(local_labels, owned)
            weight = self.weight[index]
            sampled: Optional[torch.Tensor] = index + self.class_start
        else:
            weight, sampled = self.weight, None

        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, fp64 kept
            cos = F.linear(F.normalize(x.to(dtype)), F.normalize(weight.to(dtype)))
            rows = torch.nonzero(owned).squeeze(1)
            cols = local_labels[rows]
            target = margin_target_logit(cos[rows, cols], self.margin_type, self.margin)
            logits = cos.index_put((rows, cols), target) * self.scale
            loss = distributed_softmax_cross_entropy(logits, local_labels, self.group)
        self.last_step = {
            "global_batch": int(x.shape[0]),
            "logits_shape": tuple(logits.shape),
            "sampled_classes": sampled,
        }
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"margin_type={self.margin_type!r}, scale={self.scale}, margin={self.margin}, "
            f"sample_rate={self.sample_rate}, shard=[{self.class_start}, "
            f"{self.class_start + self.num_local}) of rank {self.rank}/{self.world_size}"
        )
