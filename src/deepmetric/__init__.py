"""deepmetric: deep metric learning on PyTorch: train, evaluate with each field's protocol, ship search.

The data flow (DESIGN.md §2), one object handed to the next::

    recipe YAML + overrides -> Config -> Dataset -> PKBatchSampler -> Embedder -> loss [+ CrossBatchMemory]
    -> Trainer -> Evaluator -> EmbeddingSet -> metrics | SearchIndex -> serve

Public names are imported lazily, so ``import deepmetric`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "deepmetric.config",
    "ConfigError": "deepmetric.config",
    "load_config": "deepmetric.config",
    "UserError": "deepmetric.errors",
    "Trainer": "deepmetric.engine.trainer",
    "Evaluator": "deepmetric.engine.evaluator",
    "build_data": "deepmetric.engine.build",
    "build_model": "deepmetric.engine.build",
    "load_for_inference": "deepmetric.engine.checkpoint",
    "Embedder": "deepmetric.models",
    "build_embedder": "deepmetric.models",
    "PKBatchSampler": "deepmetric.data",
    "MetricDataset": "deepmetric.data",
    "DataSplits": "deepmetric.data",
    "EmbeddingSet": "deepmetric.inference.extract",
    "extract": "deepmetric.inference.extract",
    "build_loss": "deepmetric.losses",
    "CrossBatchMemory": "deepmetric.losses",
    "retrieval_metrics": "deepmetric.evaluation",
    "reid_metrics": "deepmetric.evaluation",
    "verification_metrics": "deepmetric.evaluation",
    "k_reciprocal_rerank": "deepmetric.evaluation",
    "SearchIndex": "deepmetric.inference.index",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepmetric' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
