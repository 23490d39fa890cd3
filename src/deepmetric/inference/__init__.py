"""Inference: embeddings as data (EmbeddingSet), search indexes and export."""
from .extract import EmbeddingSet, extract

__all__ = ["EmbeddingSet", "extract"]
