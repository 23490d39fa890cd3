"""Models: backbone catalogue, embedding head, the ``Embedder`` and weight loading."""
from .backbones import build_backbone
from .embedder import (Embedder, LoadReport, WeightsError, build_embedder, first_nonfinite, load_pretrained,
                       load_weights, read_state_dict, weight_mismatches)
from .heads import EmbeddingHead, GeM

__all__ = ["Embedder", "EmbeddingHead", "GeM", "LoadReport", "WeightsError", "build_backbone",
           "build_embedder", "first_nonfinite", "load_pretrained", "load_weights", "read_state_dict",
           "weight_mismatches"]
