"""The loss zoo: ``build_loss(name, **params)`` looks a loss up in :data:`LOSSES` and builds it.

Every loss is an ``nn.Module`` with a class attribute ``kind``:

- ``kind == "pair"``: ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None,
  ref_exclude=None) -> scalar``; owns no parameters; can be wrapped by :class:`CrossBatchMemory`.
- ``kind == "classification"``: built with ``num_classes`` and ``embedding_dim``, owns ``weight``
  ``(num_classes, embedding_dim)`` (sub-center ArcFace: ``num_classes * sub_centers`` rows);
  ``loss(embeddings, labels) -> scalar``.

Labels are int64 class ids; margins are in radians. A batch with nothing to learn from emits a
:class:`NoValidPairsWarning` and returns a zero that keeps the graph.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..registry import LOSSES
from .centroid import CenterLoss, CentroidTripletLoss
from .classification import (
    ArcFaceLoss,
    CircleClassLoss,
    ClassificationLoss,
    CosFaceLoss,
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
    SoftmaxLoss,
    SubCenterArcFaceLoss,
)
from .functional import NoValidPairsWarning
from .memory import CrossBatchMemory
from .partial_fc import PartialFC  # registers "partial_fc" (model-parallel margin head)
from .pairwise import (
    CircleLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    NPairsLoss,
    NTXentLoss,
    PairLoss,
    SupConLoss,
    XBMContrastiveLoss,
)
from .triplet import EMLLoss, QuadrupletLoss, TripletLoss


def loss_names() -> list[str]:
    """Every registered loss name (aliases included), sorted."""
    return LOSSES.names()


def build_loss(name: str, **params: Any) -> nn.Module:
    """Build the loss registered as ``name`` with keyword ``params``.

    Raises ``UnknownNameError`` (a ``KeyError``) for an unknown name, listing close matches, and
    ``ValueError`` for a parameter the loss does not take or a required one that is missing
    (classification losses need ``num_classes`` and ``embedding_dim``).
    """
    ctor = LOSSES.get(name)
    sig = inspect.signature(ctor)
    accepted = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid = [p.name for p in accepted]
    unknown = [key for key in params if key not in valid]
    if unknown:
        raise ValueError(f"loss '{name}' has no parameter '{unknown[0]}'; valid: {', '.join(valid)}")
    missing = [p.name for p in accepted if p.default is p.empty and p.name not in params]
    if missing:
        raise ValueError(f"loss '{name}' needs parameter(s) {', '.join(missing)}; valid: {', '.join(valid)}")
    return ctor(**params)


__all__ = [
    "LOSSES",
    "build_loss",
    "loss_names",
    "CrossBatchMemory",
    "NoValidPairsWarning",
    "PairLoss",
    "ClassificationLoss",
    "TripletLoss",
    "ContrastiveLoss",
    "XBMContrastiveLoss",
    "QuadrupletLoss",
    "EMLLoss",
    "NPairsLoss",
    "MultiSimilarityLoss",
    "CircleLoss",
    "SupConLoss",
    "NTXentLoss",
    "CentroidTripletLoss",
    "SoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "ArcFaceLoss",
    "SubCenterArcFaceLoss",
    "CosFaceLoss",
    "CircleClassLoss",
    "ProxyAnchorLoss",
    "CenterLoss",
    "PartialFC",
]
