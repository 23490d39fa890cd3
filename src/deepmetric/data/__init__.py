"""Data: the dataset abstraction, on-disk formats (registered by name), samplers and transforms."""
from .base import DataError, DataSplits, MetricDataset, SubsetDataset, VerificationPairs, relabel
from .samplers import PKBatchSampler, RandomBatchSampler

__all__ = ["DataError", "DataSplits", "MetricDataset", "PKBatchSampler", "RandomBatchSampler",
           "SubsetDataset", "VerificationPairs", "relabel"]
