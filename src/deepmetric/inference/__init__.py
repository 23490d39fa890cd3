"""Inference: images in, embeddings out (:class:`Predictor`), search indexes (:class:`SearchIndex`)
and export (ONNX, TorchScript). Names are imported on first use: serving an ONNX model needs no PyTorch."""
from __future__ import annotations

from ..core.lazy import lazy_exports

_EXPORTS = {
    "EmbeddingSet": "deepmetric.core.embeddings",
    "Predictor": "deepmetric.inference.predictor",
    "SearchIndex": "deepmetric.inference.index",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
