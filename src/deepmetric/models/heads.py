"""Embedding heads: pooling -> optional projection -> optional BNNeck -> optional L2 normalisation."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ParameterError


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): ``(mean x^p)^(1/p)``, ``p`` learnable."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class AvgMaxPool(nn.Module):
    """Global average plus global max pooling, summed: ``mean_hw x + max_hw x``, ``(B, C, h, w) ->
    (B, C, 1, 1)``; the pooling of Proxy-Anchor's ``net/resnet.py`` (``gap(x) + gmp(x)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)


POOLINGS = ("avg", "max", "gem", "avgmax")
#: what retrieval uses (``model.retrieval``): the head's embedding, or the pooled features before its
#: projection (L2-normalised like the embedding)
RETRIEVALS = ("embedding", "pooled")


class EmbeddingHead(nn.Module):
    """Maps a feature map ``(B, C, h, w)`` to the training outputs.

    Returns a dict with:
      - ``features``: pooled (and projected) vector, before the BNNeck, ``(B, D)``;
      - ``neck``: after the BNNeck (equal to ``features`` without one), ``(B, D)``;
      - ``embedding``: ``neck`` L2-normalised when ``normalize`` (what retrieval uses), ``(B, D)``.

    The BNNeck (Luo et al. 2019, "Bag of Tricks") is a BatchNorm1d whose bias is frozen at zero;
    re-ID recipes put metric losses on ``features`` and the classifier on ``neck``.

    ``retrieval``: what :meth:`retrieve` gives search, evaluation and export: ``embedding``, or
    ``pooled``, the pooled map before the projection (``in_channels`` wide). The losses train the
    projection either way; with few training classes it narrows to them, and the features under it
    can keep more of what new classes need (``train.fold_retrieval`` lets folds of the training
    classes choose). ``dim`` is the embedding's width (what the losses take), ``retrieval_dim`` what
    :meth:`retrieve` gives.
    """

    def __init__(self, in_channels: int, embedding_dim: int = 0, pooling: str = "avg",
                 bnneck: bool = False, normalize: bool = True, retrieval: str = "embedding") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ParameterError(f"{{pooling}} must be one of {', '.join(POOLINGS)}, got '{pooling}'", "pooling")
        if retrieval not in RETRIEVALS:
            raise ParameterError(f"{{retrieval}} must be one of {', '.join(RETRIEVALS)}, got '{retrieval}'", "retrieval")
        self.in_channels = in_channels
        self.retrieval = retrieval
        self.pool = {"avg": nn.AdaptiveAvgPool2d(1), "max": nn.AdaptiveMaxPool2d(1), "gem": GeM(),
                     "avgmax": AvgMaxPool()}[pooling]
        self.pooling = pooling
        self.proj = None
        dim = in_channels
        if embedding_dim and embedding_dim > 0:
            self.proj = nn.Linear(in_channels, embedding_dim)
            nn.init.kaiming_normal_(self.proj.weight, mode="fan_out")
            nn.init.zeros_(self.proj.bias)
            dim = embedding_dim
        self.dim = dim
        self.bnneck = None
        if bnneck:
            self.bnneck = nn.BatchNorm1d(dim)
            self.bnneck.bias.requires_grad_(False)
        self.normalize = normalize

    @property
    def retrieval_dim(self) -> int:
        return self.in_channels if self.retrieval == "pooled" else self.dim

    def forward(self, fmap: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.pool(fmap).flatten(1)
        if self.proj is not None:
            x = self.proj(x)
        neck = self.bnneck(x) if self.bnneck is not None else x
        return {"features": x, "neck": neck, "embedding": self._unit(neck)}

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` L2-normalised (in float32) with ``normalize``, else as it is."""
        return F.normalize(x.float(), dim=1) if self.normalize else x

    def retrieve(self, fmap: torch.Tensor) -> torch.Tensor:
        """What retrieval uses (``retrieval``): the embedding, or the pooled features, ``(B, retrieval_dim)``."""
        if self.retrieval == "embedding":
            return self(fmap)["embedding"]
        return self._unit(self.pool(fmap).flatten(1))
