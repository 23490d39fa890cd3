"""Data: the dataset abstraction, on-disk formats (catalogued by name), samplers and transforms.

Public names are imported on first use, so ``import deepmetric.data.formats`` (the catalogue) does
not import PyTorch.
"""
from __future__ import annotations

from ..core.lazy import lazy_exports

_EXPORTS = {
    "DataError": "base", "DataSplits": "base", "MetricDataset": "base", "SubsetDataset": "base",
    "VerificationPairs": "base", "relabel": "base",
    "PKBatchSampler": "samplers", "RandomBatchSampler": "samplers",
}
__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{module}" for name, module in _EXPORTS.items()})

__all__ = list(_EXPORTS)
