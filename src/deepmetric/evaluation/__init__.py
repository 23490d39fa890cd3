"""Evaluation: pure metric functions (retrieval, re-ID, verification, re-ranking, centroids).

All functions take numpy arrays or torch tensors (CPU or CUDA) and return plain Python floats (plus counts),
computed exactly by chunks of queries: memory grows as chunk × N, never N × N. Ties between equal distances
are broken by gallery index, lower first (a stable sort), everywhere.
"""
from .centroids import CentroidGallery, centroid_gallery, reid_metrics_centroids
from .neighbors import DISTANCES, pairwise_distances, topk_neighbors
from .query_expansion import average_query_expansion
from .reid import reid_metrics, reid_metrics_from_embeddings
from .rerank import k_reciprocal_rerank
from .results import RetrievalResults, retrieval_results
from .retrieval import rank_statistics, retrieval_metrics
from .verification import verification_metrics

__all__ = [
    "retrieval_metrics", "reid_metrics", "reid_metrics_from_embeddings", "verification_metrics",
    "k_reciprocal_rerank", "centroid_gallery", "reid_metrics_centroids", "CentroidGallery",
    "pairwise_distances", "topk_neighbors", "rank_statistics", "DISTANCES", "average_query_expansion",
    "retrieval_results", "RetrievalResults",
]
