"""Retrieval metrics (SOP / CUB / Cars / In-Shop protocols): Recall@K, mAP, MAP@R, R-precision, NMI.

Every metric is computed from the exact ranks of each query's relevant items (:func:`rank_statistics`),
obtained by chunks of queries (:mod:`deepmetric.evaluation.neighbors`): memory is O(chunk × N), and the
full-ranking mAP is exact without ever sorting whole rows when relevant items rank high.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from .neighbors import (ArrayLike, LabelGroups, RankingKeys, as_labels, as_matrix, as_matrix_pair, check_distance,
                        check_finite, chunked_member_ranks, default_chunk, embedding_key_fn, encode_labels)


def rank_statistics(ranks: torch.Tensor, relevant: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-query statistics from the 0-based ranks of the relevant items (``-1`` / ``relevant=False`` = padding).

    With ``r_1 < … < r_R`` the sorted ranks of a query's ``R`` relevant items:

    - ``ap``          = (1/R) Σ_i i / (r_i + 1)                      (average precision over the full ranking)
    - ``map@r``       = (1/R) Σ_{i: r_i < R} i / (r_i + 1)            (Musgrave et al. 2020, MAP@R)
    - ``r_precision`` = #{i : r_i < R} / R
    - ``inp``         = R / (r_R + 1)                                 (inverse negative penalty, Ye et al.)
    - ``first``       = r_1 (Recall@K / CMC@K is ``first < K``), ``num_relevant`` = R.

    Queries with R = 0 get NaN (``first = -1``).

    >>> s = rank_statistics(torch.tensor([[0, 2]]), torch.tensor([[True, True]]))
    >>> [round(float(s[k][0]), 4) for k in ("ap", "map@r", "r_precision", "inp")]
    [0.8333, 0.5, 0.5, 0.6667]
    """
    nrel = relevant.sum(1)
    big = torch.iinfo(torch.long).max
    r = torch.where(relevant, ranks, torch.full_like(ranks, big)).sort(1).values
    i = torch.arange(1, r.shape[1] + 1, device=r.device, dtype=torch.float64)
    is_rel = i[None, :] <= nrel[:, None]
    prec = torch.where(is_rel, i / (r.to(torch.float64) + 1.0), torch.zeros((), dtype=torch.float64, device=r.device))
    in_r = is_rel & (r < nrel[:, None])
    n = nrel.to(torch.float64)
    nan = torch.full_like(n, float("nan"))
    ok = nrel > 0
    last = r.gather(1, (nrel - 1).clamp_min(0)[:, None])[:, 0] if r.shape[1] else torch.zeros_like(nrel)
    return {
        "num_relevant": nrel,
        "first": torch.where(ok, r[:, 0] if r.shape[1] else nrel, torch.full_like(nrel, -1)),
        "ap": torch.where(ok, prec.sum(1) / n, nan),
        "map@r": torch.where(ok, (prec * in_r).sum(1) / n, nan),
        "r_precision": torch.where(ok, in_r.sum(1) / n, nan),
        "inp": torch.where(ok, n / (last.to(torch.float64) + 1.0), nan),
    }


def answered_queries(stats: Dict[str, np.ndarray], caller: str, why: str = "no relevant gallery item",
                     stacklevel: int = 3) -> np.ndarray:
    """Mask of the queries that have a relevant item; the others are skipped, and said so: a warning
    from ``caller`` (at ``stacklevel`` above this function) and the ``skipped_queries`` count."""
    ok = stats["num_relevant"] > 0
    skipped = int((~ok).sum())
    if skipped:
        warnings.warn(f"{caller}: {skipped} of {len(ok)} queries have {why} and are skipped (counted in "
                      "'skipped_queries')", stacklevel=stacklevel + 1)
    return ok


def collect_statistics(chunks) -> Dict[str, np.ndarray]:
    """Concatenate :func:`rank_statistics` over ``(r0, r1, ranks, relevant)`` chunks into numpy arrays."""
    parts: Dict[str, list] = {}
    for _, _, ranks, relevant in chunks:
        for key, val in rank_statistics(ranks, relevant).items():
            parts.setdefault(key, []).append(val.cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def kmeans_assign(x: torch.Tensor, k: int, seed: int = 0, iters: int = 20,
                  chunk_size: Optional[int] = None) -> np.ndarray:
    """Lloyd's k-means (Euclidean) on the rows of ``x``; returns each row's cluster index.

    Seeding: the initial centres are ``k`` distinct rows drawn by ``torch.randperm`` from a CPU generator
    seeded with ``seed``; then ``iters`` assignment/update rounds (like faiss' default used by PML, 20
    rounds, random init). An empty cluster keeps its previous centre. Ties go to the lower cluster index.
    Deterministic for a given seed on a given device.
    """
    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    centres = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    step = default_chunk(k, chunk_size)

    def assign() -> torch.Tensor:
        rk = RankingKeys(centres, "squared_euclidean")
        return torch.cat([rk.keys(x[s : s + step])[:, :k].argmin(1) for s in range(0, n, step)])

    for _ in range(iters):
        a = assign()
        sums = torch.zeros_like(centres).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k)
        full = counts > 0
        centres[full] = sums[full] / counts[full, None].to(x.dtype)
    return assign().cpu().numpy()


def _the_query_itself(r0: int, r1: int, members: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Leave-one-out: the member whose gallery index is the query's own index (not 'the first neighbour')."""
    return valid & (members == torch.arange(r0, r1, device=members.device)[:, None])


def retrieval_metrics(query: ArrayLike, query_labels: ArrayLike, gallery: Optional[ArrayLike] = None,
                      gallery_labels: Optional[ArrayLike] = None, ks: Sequence[int] = (1, 10, 100, 1000),
                      distance: str = "cosine", nmi: bool = False, chunk_size: Optional[int] = None, *,
                      nmi_seed: int = 0, return_per_query: bool = False) -> Dict[str, object]:
    """Exact retrieval metrics of ``query (Q, D)`` against ``gallery (N, D)`` (numpy or torch, CPU or CUDA).

    ``gallery=None`` is leave-one-out on the query set (SOP / CUB / Cars): every other query is a gallery
    item and each query is excluded **by its own index** (exact duplicates of it at distance 0 stay and count
    as relevant). A gallery item is relevant when its label equals the query's (exact comparison; any int or
    string labels). With the sorted 0-based ranks ``r_1 < … < r_R`` of the R relevant items
    (see :func:`rank_statistics`):

    - ``recall@K``   = mean over queries of [r_1 < K]          (any relevant item in the top K; PML's P@1 at K=1)
    - ``precision@1`` = ``recall@1``
    - ``map``        = mean of (1/R) Σ_i i/(r_i+1)               (AP over the full ranking = PML MAP with k=None)
    - ``map@r``      = mean of (1/R) Σ_{r_i<R} i/(r_i+1)        (PML ``mean_average_precision_at_r``)
    - ``r_precision`` = mean of #{r_i < R} / R
    - ``mrr``        = mean of 1 / (r_1 + 1)                    (mean reciprocal rank, PML's with k=None)
    - ``nmi`` (``nmi=True``): NMI (sklearn) of the query labels vs k-means clusters of the query embeddings,
      k = number of distinct query labels, seeded by ``nmi_seed`` (:func:`kmeans_assign`); with
      ``distance="cosine"`` the clustering runs on L2-normalised embeddings.

    Queries with no relevant item (singleton classes in leave-one-out, labels absent from the gallery) are
    skipped, counted in ``skipped_queries`` and warned about; ``num_queries`` counts all queries. If every
    query is skipped the metrics are NaN. Ties: lower gallery index first (module ``neighbors``). K larger
    than the gallery is allowed (it is then recall over the whole ranking). ``return_per_query=True`` adds
    ``"per_query"``: numpy arrays ``ap``, ``map@r``, ``r_precision``, ``first`` (rank of the first relevant
    item, -1 if skipped), ``num_relevant``.

    Raises ``ValueError`` on an empty query set or gallery, mismatched lengths or dimensions, an unknown
    distance, non-finite embeddings.

    >>> x = np.array([[0.0], [0.1], [1.0], [1.2], [5.0]]); y = np.array([0, 0, 1, 1, 2])
    >>> m = retrieval_metrics(x, y, ks=(1, 2), distance="euclidean")
    >>> m["recall@1"], m["map"], m["skipped_queries"], m["num_queries"]
    (1.0, 1.0, 1, 5)
    """
    check_distance(distance)
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    loo = gallery is None
    if loo and gallery_labels is not None:
        raise ValueError("gallery_labels given without gallery")
    if not loo and gallery_labels is None:
        raise ValueError("gallery given without gallery_labels")
    q, g = (as_matrix(query, "query"),) * 2 if loo else as_matrix_pair(query, gallery)
    if q.shape[0] == 0:
        raise ValueError("retrieval_metrics: the query set is empty")
    if g.shape[0] == 0 or (loo and q.shape[0] < 2):
        raise ValueError("retrieval_metrics: the gallery is empty (leave-one-out needs at least 2 queries)")
    check_finite(q, "query")
    if not loo:
        check_finite(g, "gallery")
    ql = as_labels(query_labels, q.shape[0], "query_labels")
    gl = ql if loo else as_labels(gallery_labels, g.shape[0], "gallery_labels")
    (qc, gc), num_codes = encode_labels(ql, gl)

    rk = RankingKeys(g, distance)
    groups = LabelGroups(gc, num_codes, q.device)
    chunks = chunked_member_ranks(embedding_key_fn(q, rk), q.shape[0], g.shape[0], qc, groups,
                                  _the_query_itself if loo else None,
                                  default_chunk(rk.width, chunk_size), q.device)
    stats = collect_statistics(chunks)

    ok = answered_queries(stats, "retrieval_metrics", stacklevel=2)
    skipped = int((~ok).sum())
    first = stats["first"][ok]

    def mean(v: np.ndarray) -> float:
        return float(np.mean(v)) if len(v) else float("nan")

    out: Dict[str, object] = {f"recall@{k}": mean(first < k) for k in ks}
    out["precision@1"] = mean(first < 1)
    out["map"] = mean(stats["ap"][ok])
    out["map@r"] = mean(stats["map@r"][ok])
    out["r_precision"] = mean(stats["r_precision"][ok])
    out["mrr"] = mean(1.0 / (first + 1.0))
    if nmi:
        x = torch.nn.functional.normalize(q, dim=1) if distance == "cosine" else q
        clusters = kmeans_assign(x, int(len(np.unique(qc))), seed=nmi_seed, chunk_size=chunk_size)
        out["nmi"] = float(normalized_mutual_info_score(qc, clusters))
    out["skipped_queries"] = skipped
    out["num_queries"] = int(q.shape[0])
    if return_per_query:
        out["per_query"] = {k: stats[k] for k in ("ap", "map@r", "r_precision", "first", "num_relevant")}
    return out
