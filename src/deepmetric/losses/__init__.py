"""The loss zoo: ``build_loss(name, **params)`` looks a loss up in :data:`LOSSES` and builds it.

Every loss is a :class:`~deepmetric.losses.base.Loss` (an ``nn.Module``) with a class attribute ``kind``:

- ``kind == "pair"``: ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None,
  ref_exclude=None) -> scalar``; owns no parameters; can be wrapped by :class:`CrossBatchMemory`.
- ``kind == "classification"``: built with ``num_classes`` and ``embedding_dim``, owns ``weight``
  ``(num_classes, embedding_dim)`` (sub-center ArcFace: ``num_classes * sub_centers`` rows);
  ``loss(embeddings, labels) -> scalar``.

Labels are int64 class ids; margins are in radians. A batch with nothing to learn from emits a
:class:`NoValidPairsWarning` and returns a zero that keeps the graph.

The catalogues below name every loss and miner; their modules (and PyTorch) are imported when one is
first looked up or a class is first used, so ``deepmetric list`` reads the names without PyTorch.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ..core.lazy import lazy_exports
from ..core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

#: every loss by name (aliases included): ``name -> "module:class"``
LOSSES = Registry("loss", {
    "triplet": "deepmetric.losses.triplet:TripletLoss",
    "quadruplet": "deepmetric.losses.triplet:QuadrupletLoss",
    "msml": "deepmetric.losses.triplet:QuadrupletLoss",
    "eml": "deepmetric.losses.triplet:EMLLoss",
    "contrastive": "deepmetric.losses.pairwise:ContrastiveLoss",
    "contrastive_xbm": "deepmetric.losses.pairwise:XBMContrastiveLoss",
    "multi_similarity": "deepmetric.losses.pairwise:MultiSimilarityLoss",
    "circle": "deepmetric.losses.pairwise:CircleLoss",
    "supcon": "deepmetric.losses.pairwise:SupConLoss",
    "ntxent": "deepmetric.losses.pairwise:NTXentLoss",
    "infonce": "deepmetric.losses.pairwise:NTXentLoss",
    "npairs": "deepmetric.losses.pairwise:NPairsLoss",
    "centroid_triplet": "deepmetric.losses.centroid:CentroidTripletLoss",
    "ctl": "deepmetric.losses.centroid:CentroidTripletLoss",
    "center": "deepmetric.losses.centroid:CenterLoss",
    "softmax": "deepmetric.losses.classification:SoftmaxLoss",
    "normalized_softmax": "deepmetric.losses.classification:NormalizedSoftmaxLoss",
    "arcface": "deepmetric.losses.classification:ArcFaceLoss",
    "arcmargin": "deepmetric.losses.classification:ArcFaceLoss",
    "subcenter_arcface": "deepmetric.losses.classification:SubCenterArcFaceLoss",
    "cosface": "deepmetric.losses.classification:CosFaceLoss",
    "am_softmax": "deepmetric.losses.classification:CosFaceLoss",
    "circle_class": "deepmetric.losses.classification:CircleClassLoss",
    "proxy_anchor": "deepmetric.losses.classification:ProxyAnchorLoss",
    "partial_fc": "deepmetric.losses.partial_fc:PartialFC",
})

#: the miners, usable on their own on a distance or similarity matrix with pair masks (see
#: :mod:`deepmetric.losses.miners`); the pair losses take them through ``mining`` / ``miner_epsilon``
MINERS = Registry("miner", {
    "multi_similarity": "deepmetric.losses.miners:multi_similarity_mine",
    "batch_hard": "deepmetric.losses.miners:batch_hard_terms",
    "random_triplet": "deepmetric.losses.miners:random_triplet_terms",
    "triplet_margin": "deepmetric.losses.miners:triplet_margin_terms",
})

_CLASSES = {
    "Loss": "base", "NoValidPairsWarning": "functional", "CrossBatchMemory": "memory",
    "PairLoss": "pairwise", "ContrastiveLoss": "pairwise", "XBMContrastiveLoss": "pairwise",
    "MultiSimilarityLoss": "pairwise", "CircleLoss": "pairwise", "SupConLoss": "pairwise",
    "NTXentLoss": "pairwise", "NPairsLoss": "pairwise",
    "TripletLoss": "triplet", "QuadrupletLoss": "triplet", "EMLLoss": "triplet",
    "CentroidTripletLoss": "centroid", "CenterLoss": "centroid",
    "ClassificationLoss": "classification", "SoftmaxLoss": "classification",
    "NormalizedSoftmaxLoss": "classification", "ArcFaceLoss": "classification",
    "SubCenterArcFaceLoss": "classification", "CosFaceLoss": "classification",
    "CircleClassLoss": "classification", "ProxyAnchorLoss": "classification",
    "PartialFC": "partial_fc",
}
__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{module}" for name, module in _CLASSES.items()})


def loss_names() -> list[str]:
    """Every registered loss name (aliases included), sorted."""
    return LOSSES.names()


def build_loss(name: str, **params: Any) -> "nn.Module":
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


__all__ = ["LOSSES", "MINERS", "build_loss", "loss_names", *_CLASSES]
