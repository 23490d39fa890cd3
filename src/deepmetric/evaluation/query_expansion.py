"""Average query expansion (alpha-weighted AQE), as FastReID's ``TEST.AQE`` applies it.

Chum et al., "Total Recall" (ICCV 2007); alpha-QE of Radenović et al. (TPAMI 2018); FastReID
``evaluation/query_expansion.py::aqe`` (after PyRetri). Every vector ``x_i`` of the pool (the
queries, then the gallery) is replaced by

    x_i' = (1 / k) * sum_{j in N_k(i)} cos(x_i, x_j) ** alpha * x_j

where ``N_k(i)`` are the ``k`` pool vectors most cosine-similar to ``x_i``, itself included (it is
its own nearest neighbour). The raw vectors are averaged; cosines come from the L2-normalised ones.
``times`` rounds repeat it on the previous round's vectors. FastReID defaults (``config/defaults.py``):
``k=5, alpha=3.0, times=1``.

As in FastReID, queries are part of the pool, so a query may borrow from another query's vector (a
transductive step: all queries must be known together). Ties in similarity are broken by pool
index, lower first (FastReID's ``argpartition`` picks among ties arbitrarily). For a non-integer
``alpha``, negative cosines get weight 0 (FastReID's ``np.power`` makes them NaN).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .neighbors import ArrayLike, as_matrix, topk_neighbors


def average_query_expansion(
    query: ArrayLike,
    gallery: Optional[ArrayLike] = None,
    k: int = 5,
    alpha: float = 3.0,
    times: int = 1,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Expanded ``query (Q, D)`` and ``gallery (G, D)`` vectors (float32 or float64, same device).

    ``gallery=None`` (leave-one-out protocols) expands the query set alone and returns one tensor.

    >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    >>> out = average_query_expansion(x, k=2, alpha=1.0)  # x0' = (x0 + cos(x0, x1) x1) / 2
    >>> [round(v, 4) for v in out[0].tolist()]
    [0.8536, 0.3536]
    """
    if k < 1 or times < 1:
        raise ValueError(f"average_query_expansion: k and times must be >= 1, got k={k}, times={times}")
    q = as_matrix(query, "query")
    parts = [q] if gallery is None else [q, as_matrix(gallery, "gallery", device=q.device)]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    pool = torch.cat([p.to(dtype) for p in parts])
    if pool.shape[0] == 0:
        raise ValueError("average_query_expansion: empty query and gallery")
    k = min(int(k), pool.shape[0])
    integer_alpha = float(alpha).is_integer()
    step = max(1, (1 << 24) // (k * pool.shape[1]))  # a chunk's (rows, k, D) gather stays near 64 MB
    for _ in range(int(times)):
        unit = F.normalize(pool, dim=1)
        _, idx = topk_neighbors(unit, unit, k=k, distance="cosine", chunk_size=chunk_size)
        out = torch.empty_like(pool)
        for r0 in range(0, pool.shape[0], step):
            nb = idx[r0 : r0 + step]
            sims = torch.einsum("cd,ckd->ck", unit[r0 : r0 + step], unit[nb])
            weights = sims.pow(alpha) if integer_alpha else sims.clamp_min(0.0).pow(alpha)
            out[r0 : r0 + step] = (pool[nb] * weights.unsqueeze(-1)).mean(1)
        pool = out
    if gallery is None:
        return pool
    return pool[: q.shape[0]], pool[q.shape[0]:]
