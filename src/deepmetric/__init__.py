"""deepmetric: deep metric learning on PyTorch: train, evaluate with each field's protocol, ship search.

The data flow (docs/architecture.md draws it whole), one object handed to the next::

    recipe YAML + overrides -> Config -> Dataset -> PKBatchSampler -> Embedder -> loss [+ CrossBatchMemory]
    -> Trainer -> Evaluator -> EmbeddingSet -> metrics | SearchIndex -> serve

Public names are imported lazily, so ``import deepmetric`` stays cheap.
"""
from __future__ import annotations

import logging

from .core import __version__
from .core import drawing as _drawing
from .core.lazy import lazy_exports

_EXPORTS = {
    "Config": "deepmetric.config",
    "ConfigError": "deepmetric.config",
    "load_config": "deepmetric.config",
    "UserError": "deepmetric.core.errors",
    "EmbeddingSet": "deepmetric.core.embeddings",
    "EvalResult": "deepmetric.core.results",
    "RetrievalResults": "deepmetric.core.results",
    "Trainer": "deepmetric.engine.trainer",
    "auto_config": "deepmetric.engine.auto",
    "Callback": "deepmetric.engine.callbacks",
    "MLflowCallback": "deepmetric.engine.tracking",
    "Evaluator": "deepmetric.engine.evaluator",
    "build_data": "deepmetric.engine.build",
    "build_model": "deepmetric.engine.build",
    "load_for_inference": "deepmetric.engine.build",
    "extract": "deepmetric.engine.extract",
    "Embedder": "deepmetric.models",
    "build_embedder": "deepmetric.models",
    "PKBatchSampler": "deepmetric.data",
    "MetricDataset": "deepmetric.data",
    "DataSplits": "deepmetric.data",
    "build_loss": "deepmetric.losses",
    "CrossBatchMemory": "deepmetric.losses",
    "retrieval_metrics": "deepmetric.evaluation",
    "reid_metrics": "deepmetric.evaluation",
    "verification_metrics": "deepmetric.evaluation",
    "k_reciprocal_rerank": "deepmetric.evaluation",
    "SearchIndex": "deepmetric.inference.index",
    "Predictor": "deepmetric.inference.predictor",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

# RetrievalResults (core) draws through deepmetric.viz.retrieval, which core may not import itself
_drawing.register("retrieval", "deepmetric.viz.retrieval")

# A library stays quiet until its user configures logging (the CLI does); it never calls basicConfig.
logging.getLogger("deepmetric").addHandler(logging.NullHandler())

__all__ = ["__version__", *_EXPORTS]
