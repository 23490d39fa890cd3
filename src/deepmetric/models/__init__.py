"""Models: backbone catalogue, embedding head, the ``Embedder`` and weight loading.

:data:`BACKBONES` names every backbone; the modules (and PyTorch) are imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..core.lazy import lazy_exports
from ..core.registry import Registry

#: the backbones by name (``timm:<name>`` builds any timm model): ``name -> "module:constructor"``
BACKBONES = Registry("backbone", {
    **{f"resnet{d}": f"deepmetric.models.backbones:resnet{d}" for d in (18, 34, 50, 101)},
    "small_cnn": "deepmetric.models.backbones:small_cnn",
})

if TYPE_CHECKING:
    from torch import nn

    from .embedder import Embedder

_EXPORTS = {
    "Embedder": "embedder", "Ensemble": "embedder", "LoadReport": "embedder", "WeightsError": "embedder",
    "first_nonfinite": "embedder", "join_embeddings": "embedder", "retrieval_as": "embedder", "load_pretrained": "embedder", "load_weights": "embedder",
    "read_state_dict": "embedder", "weight_mismatches": "embedder",
    "EmbeddingHead": "heads", "GeM": "heads",
}
__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{module}" for name, module in _EXPORTS.items()})



def build_backbone(name: str, in_chans: int = 3, **options) -> "nn.Module":
    """A feature-map trunk: a :data:`BACKBONES` name (``resnet50``, ``small_cnn``) or ``timm:<any timm name>``."""
    if name.startswith("timm:"):
        from .backbones import TimmTrunk

        return TimmTrunk(name[len("timm:"):], in_chans=in_chans, **options)
    return BACKBONES.build(name, in_chans=in_chans, **options)


def build_embedder(backbone: str = "resnet50", embedding_dim: int = 0, pooling: str = "avg",
                   bnneck: bool = False, normalize: bool = True, in_chans: int = 3,
                   backbone_options: Optional[dict] = None, retrieval: str = "embedding") -> "Embedder":
    """``Embedder(backbone ► head)`` from the backbone's name and the head's settings."""
    from .embedder import Embedder
    from .heads import EmbeddingHead

    trunk = build_backbone(backbone, in_chans=in_chans, **(backbone_options or {}))
    return Embedder(trunk, EmbeddingHead(trunk.out_channels, embedding_dim, pooling, bnneck, normalize, retrieval))


__all__ = ["BACKBONES", "build_backbone", "build_embedder", *_EXPORTS]
