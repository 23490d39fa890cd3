"""Person / vehicle re-identification metrics: CMC, mAP and mINP (Market-1501 / DukeMTMC protocol).

Protocol (torchreid ``eval_market1501``, FastReID ``evaluate_rank``): per query, gallery images with the
**same pid and the same camera** are removed from its ranking; the other images of its pid (other cameras)
are the relevant ones; same-camera images of other pids stay as negatives. Queries with no relevant image
left are skipped. Unlike those implementations, ties are broken by gallery index (a stable sort; theirs is
``np.argsort``'s quicksort, unspecified), the work is vectorised by chunks of queries, and the CMC does not
crash when a filtered list is shorter than ``max_rank``.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from ..core.embeddings import EmbeddingSet
from .neighbors import (ArrayLike, LabelGroups, RankingKeys, as_labels, as_matrix_pair, check_distance, check_finite,
                        chunked_member_ranks, default_chunk, embedding_key_fn, encode_labels, matrix_key_fn,
                        pairwise_distances)
from .rerank import k_reciprocal_rerank
from .retrieval import answered_queries, collect_statistics


def summarize_reid(stats: Dict[str, np.ndarray], max_rank: int, caller: str) -> Dict[str, object]:
    """Aggregate per-query :func:`~deepmetric.evaluation.retrieval.rank_statistics` into re-ID metrics."""
    ok = answered_queries(stats, caller, "no relevant gallery item after removing same-pid same-camera images",
                          stacklevel=3)
    skipped = int((~ok).sum())
    first = stats["first"][ok]
    n_ok = int(ok.sum())

    def cmc_at(k: int) -> float:
        return float(np.mean(first < k)) if n_ok else float("nan")

    return {
        "cmc": [cmc_at(k) for k in range(1, max_rank + 1)],
        "rank1": cmc_at(1), "rank5": cmc_at(5), "rank10": cmc_at(10),
        "map": float(np.mean(stats["ap"][ok])) if n_ok else float("nan"),
        "minp": float(np.mean(stats["inp"][ok])) if n_ok else float("nan"),
        "skipped_queries": skipped,
        "num_queries": int(len(ok)),
    }


def _camera_ignore(q_cam: Optional[np.ndarray], g_cam: Optional[np.ndarray], device: torch.device):
    if q_cam is None or g_cam is None:
        return None
    qc = torch.as_tensor(q_cam, device=device)
    gc = torch.as_tensor(g_cam, device=device)

    def ignore(r0, r1, members, valid):  # members already share the query's pid: drop the same-camera ones
        return valid & (gc[members.clamp_min(0)] == qc[r0:r1, None])

    return ignore


def reid_metrics(distances: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                 g_camids: ArrayLike, max_rank: int = 50, chunk_size: Optional[int] = None) -> Dict[str, object]:
    """CMC / mAP / mINP from a ``(Q, G)`` distance matrix (lower = closer; numpy or torch, CPU or CUDA).

    For query q, drop gallery items with ``g_pid == q_pid and g_camid == q_camid``; in the remaining ranking
    (stable: ties by gallery index) let ``r_1 < … < r_R`` be the 0-based positions of the R items with
    ``g_pid == q_pid``. Then

    - CMC@k = mean over queries of [r_1 < k], for k = 1 … ``max_rank`` (``max_rank`` capped at G, as torchreid);
      ``rank1/5/10`` = CMC@1/5/10;
    - AP = (1/R) Σ_i i / (r_i + 1) over the whole filtered ranking; ``map`` = mean AP;
    - INP = R / (r_R + 1) (FastReID); ``minp`` = mean INP.

    Queries with R = 0 are skipped (counted in ``skipped_queries``, with a warning; all skipped → NaN metrics).
    ``q_camids``/``g_camids`` may both be None to switch off the same-camera removal (DF1 / Street2Shop style).
    Raises ``ValueError`` on an empty gallery, NaN distances, or mismatched lengths.

    >>> d = np.array([[0.1, 0.2, 0.3]]); m = reid_metrics(d, [1], [1, 2, 1], [0], [0, 1, 1], max_rank=3)
    >>> m["cmc"], m["map"], m["minp"]
    ([0.0, 1.0, 1.0], 0.5, 0.5)
    """
    dist = distances.detach() if torch.is_tensor(distances) else torch.from_numpy(np.ascontiguousarray(distances))
    if dist.ndim != 2:
        raise ValueError(f"distances must be (Q, G), got shape {tuple(dist.shape)}")
    if dist.dtype not in (torch.float32, torch.float64):
        dist = dist.to(torch.float32)
    n_q, n_g = dist.shape
    if n_g == 0 or n_q == 0:
        raise ValueError(f"reid_metrics: empty query set or gallery (distances shape {tuple(dist.shape)})")
    if (q_camids is None) != (g_camids is None):
        raise ValueError("reid_metrics: pass both q_camids and g_camids, or neither")
    qp, gp = as_labels(q_pids, n_q, "q_pids"), as_labels(g_pids, n_g, "g_pids")
    (qc, gc), num_codes = encode_labels(qp, gp)
    qcam = None if q_camids is None else encode_labels(as_labels(q_camids, n_q, "q_camids"),
                                                       as_labels(g_camids, n_g, "g_camids"))[0]
    key_fn, width = matrix_key_fn(dist)
    max_rank = max(1, min(int(max_rank), n_g))
    chunks = chunked_member_ranks(key_fn, n_q, n_g, qc, LabelGroups(gc, num_codes, dist.device),
                                  _camera_ignore(*(qcam or (None, None)), dist.device),
                                  default_chunk(width, chunk_size), dist.device)
    return summarize_reid(collect_statistics(chunks), max_rank, "reid_metrics")


def reid_metrics_from_embeddings(query: EmbeddingSet, gallery: EmbeddingSet, distance: str = "euclidean",
                                 max_rank: int = 50, rerank: bool = False, chunk_size: Optional[int] = None,
                                 **rerank_kw) -> Dict[str, object]:
    """:func:`reid_metrics` of two :class:`EmbeddingSet` s (``labels`` = pids, ``camids`` = cameras).

    ``distance``: ``"euclidean"`` (L2), ``"squared_euclidean"`` (torchreid's ``'euclidean'``, centroids-reid on
    normalised vectors) or ``"cosine"`` (FastReID's default ``1 − cos``); all three rank raw, unnormalised
    vectors except cosine. Without re-ranking nothing of size Q × G is built: keys come by query chunks.
    ``rerank=True`` builds the query-gallery, query-query and gallery-gallery distance matrices with that
    distance and applies :func:`~deepmetric.evaluation.k_reciprocal_rerank` (``**rerank_kw``: k1, k2,
    lambda_value). Note it squares its input: ``distance="squared_euclidean"`` reproduces torchreid
    (``re_ranking`` of squared L2), ``"euclidean"`` reproduces Zhong et al.'s original code.
    Camera ids missing on either set switch off the same-camera removal.

    >>> q = EmbeddingSet(torch.tensor([[0.0, 1.0]]), [7], camids=[0])
    >>> g = EmbeddingSet(torch.tensor([[0.0, 1.1], [0.0, 0.9], [1.0, 0.0]]), [7, 7, 3], camids=[0, 1, 1])
    >>> reid_metrics_from_embeddings(q, g, max_rank=2)["cmc"]
    [1.0, 1.0]
    """
    check_distance(distance)
    q, g = as_matrix_pair(query.vectors, gallery.vectors, ("query.vectors", "gallery.vectors"))
    if len(query) == 0 or len(gallery) == 0:
        raise ValueError("reid_metrics_from_embeddings: empty query set or gallery")
    check_finite(q, "query.vectors")
    check_finite(g, "gallery.vectors")
    cams = (query.camids, gallery.camids) if query.camids is not None and gallery.camids is not None else (None, None)
    if rerank:
        qg = pairwise_distances(q, g, distance, chunk_size)
        qq = pairwise_distances(q, q, distance, chunk_size)
        gg = pairwise_distances(g, g, distance, chunk_size)
        final = k_reciprocal_rerank(qg, qq, gg, **rerank_kw)
        del qq, gg
        return reid_metrics(final, query.labels, gallery.labels, *cams, max_rank=max_rank, chunk_size=chunk_size)
    if rerank_kw:
        raise ValueError(f"re-ranking options {sorted(rerank_kw)} given with rerank=False")
    (qc, gc), num_codes = encode_labels(query.labels, gallery.labels)
    qcam = None if cams[0] is None else encode_labels(*cams)[0]
    rk = RankingKeys(g, distance)
    chunks = chunked_member_ranks(embedding_key_fn(q, rk), len(query), len(gallery), qc,
                                  LabelGroups(gc, num_codes, q.device),
                                  _camera_ignore(*(qcam or (None, None)), q.device),
                                  default_chunk(rk.width, chunk_size), q.device)
    return summarize_reid(collect_statistics(chunks), max(1, min(int(max_rank), len(gallery))),
                          "reid_metrics_from_embeddings")
