"""Models: backbone catalogue, embedding head, the ``Embedder`` and weight loading."""
from .backbones import build_backbone
from .embedder import Embedder, LoadReport, WeightsError, build_embedder, load_pretrained, load_weights, read_state_dict
from .heads import EmbeddingHead, GeM

__all__ = ["Embedder", "EmbeddingHead", "GeM", "LoadReport", "WeightsError", "build_backbone",
           "build_embedder", "load_pretrained", "load_weights", "read_state_dict"]
