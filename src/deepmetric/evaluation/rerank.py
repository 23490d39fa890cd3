"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
CVPR 2017), computing exactly what torchreid's ``re_ranking`` computes, vectorised and by chunks.

torchreid builds five dense (Q+G)² float32 matrices and loops in Python over every row (its memory and
time against ours: ``benchmarks/bench_eval.py --only rerank``). Here only the top-k lists and the sparse k-reciprocal vectors V are kept:
neighbour lists come from chunks of rows, V is sparse (a few dozen non-zeros per row), the local query
expansion is a sparse row average and the Jaccard term Σ_k min(V_ik, V_jk) runs through an inverted index
(gallery entries grouped by column) with one scatter-add per chunk of queries.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .neighbors import ArrayLike, padded_width, stable_topk

_WORK = 1 << 24  # (query entry × gallery entry) pairs handled per Jaccard chunk


def _tensor(x: ArrayLike, device: Optional[torch.device]) -> torch.Tensor:
    t = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return t if device is None else t.to(device)


def _segments(starts: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expand segments: owner o owns ``lengths[o]`` positions from ``starts[o]``; returns (owner, position)."""
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    offset = torch.arange(owner.numel(), device=lengths.device) - (torch.cumsum(lengths, 0) - lengths)[owner]
    return owner, starts[owner] + offset


def k_reciprocal_rerank(q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, *, chunk_size: Optional[int] = None,
                        device: Optional[torch.device] = None) -> np.ndarray:
    """Re-ranked ``(Q, G)`` float32 distances, equal (to float rounding) to torchreid's ``re_ranking``.

    With M the (Q+G)² matrix [[q_q, q_g], [q_gᵀ, g_g]] and N = Q + G:

    1. d(i, j) = M[j, i]² / max_k M[k, i]²   (**the input is squared**: feed L2 for Zhong's original, squared
       L2 to match torchreid's pipeline); neighbour lists N(i, k) = the k smallest of row i (stable ties).
    2. R(i) = {j ∈ N(i, k1+1) : i ∈ N(j, k1+1)}; for each j ∈ R(i) with R½(j) = its k-reciprocal set at
       round(k1/2) (half to even), add R½(j) when |R½(j) ∩ R(i)| > ⅔ |R½(j)|.
    3. V[i, j] = exp(−d(i, j)) / Σ_{j' ∈ R*(i)} exp(−d(i, j')) on the expanded set R*(i), 0 elsewhere.
    4. Local query expansion (k2 ≠ 1): V[i] ← mean of V[n] over n ∈ N(i, k2).
    5. J(i, j) = 1 − Σ_k min(V_ik, V_jk) / (2 − Σ_k min(V_ik, V_jk)).
    6. Result = (1 − λ)·J + λ·d, restricted to query rows and gallery columns.

    Inputs are numpy or torch, float32 or float64 (torchreid squares in the input precision, then float32);
    the work runs on ``device`` (default: where ``q_g_dist`` lives). Differences from torchreid: ties in the
    neighbour lists are broken by index (torchreid's quicksort argsort leaves them unspecified), and float32
    sums may be added in another order (≈1e-7).

    >>> qg = np.array([[0.1, 0.9], [0.8, 0.2]]); qq = gg = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> k_reciprocal_rerank(qg, qq, gg, k1=1, k2=1).astype(float).round(3).tolist()
    [[0.01, 0.943], [0.892, 0.039]]
    """
    return _rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value, chunk_size, device)


def _rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value, chunk_size, device) -> np.ndarray:
    m = _Distances.of(q_g_dist, q_q_dist, g_g_dist, device)
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    n = m.n
    top, colmax = _top_lists(m, min(max(k1 + 1, k2), n), chunk_size or max(16, (1 << 24) // n))
    kk, kh = min(k1 + 1, n), min(int(round(k1 / 2.0)) + 1, n)
    row, col, val = _sparse_v(m, top[:, :kk].contiguous(), top[:, :kh].contiguous(), colmax)
    k2 = min(k2, n)
    if k2 != 1:
        row, col, val = _local_query_expansion(row, col, val, top[:, :k2].reshape(-1), k2, n)
    return _jaccard_blend(m, row, col, val, colmax, lambda_value)


class _Distances:
    """M = [[q_q, q_g], [q_gᵀ, g_g]] (``N = Q + G`` rows) without building it: its three blocks, in
    their common floating precision, on one device."""

    def __init__(self, qg: torch.Tensor, qq: torch.Tensor, gg: torch.Tensor) -> None:
        self.qg, self.qq, self.gg = qg, qq, gg
        self.n_q, self.n_g = qg.shape
        self.n, self.dev, self.dt = self.n_q + self.n_g, qg.device, qg.dtype

    @classmethod
    def of(cls, q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, device) -> "_Distances":
        qg = _tensor(q_g_dist, device)
        qq, gg = _tensor(q_q_dist, qg.device), _tensor(g_g_dist, qg.device)
        n_q, n_g = qg.shape
        if tuple(qq.shape) != (n_q, n_q) or tuple(gg.shape) != (n_g, n_g):
            raise ValueError(f"shapes must be q_g (Q, G), q_q (Q, Q), g_g (G, G); got {tuple(qg.shape)}, "
                             f"{tuple(qq.shape)}, {tuple(gg.shape)}")
        if n_q == 0 or n_g == 0:
            raise ValueError("k_reciprocal_rerank: empty query set or gallery")
        dt = torch.promote_types(torch.promote_types(qg.dtype, qq.dtype), gg.dtype)
        if not dt.is_floating_point:
            dt = torch.float64
        return cls(qg.to(dt), qq.to(dt), gg.to(dt))

    def d_at(self, colmax: torch.Tensor, i: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``d(i, e) = M[e, i]² / colmax[i]`` for index tensors ``i`` and ``e``."""
        n_q, n_g = self.n_q, self.n_g
        e_q, i_q = e < n_q, i < n_q
        eg, ig = e - n_q, i - n_q
        idx = torch.where(e_q, torch.where(i_q, e * n_q + i, e * n_g + ig),
                          torch.where(i_q, i * n_g + eg, eg * n_g + ig))
        out = torch.empty(i.shape, dtype=self.dt, device=self.dev)
        for sel, block in ((e_q & i_q, self.qq), (e_q ^ i_q, self.qg), (~e_q & ~i_q, self.gg)):
            out[sel] = block.reshape(-1)[idx[sel]]
        return _sq(out) / colmax[i]


def _sq(x: torch.Tensor) -> torch.Tensor:
    return (x * x).to(torch.float32)


def _square_transposed(dst: torch.Tensor, src_cols: torch.Tensor) -> None:
    """``dst = (src_colsᵀ)²``, tile by tile on CPU (a 64-row tile stays in cache, and numpy's strided
    copy beats torch's there)."""
    if dst.device.type == "cpu":
        d_np, s_np = dst.numpy(), src_cols.numpy()
        for r in range(0, s_np.shape[0], 64):
            tile = s_np[r : r + 64].T
            np.multiply(tile, tile, out=d_np[:, r : r + 64])
    else:
        dst.copy_(src_cols.T * src_cols.T)


def _square_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst = src²`` without a (rows × G) temporary."""
    if dst.device.type == "cpu":
        np.multiply(src.numpy(), src.numpy(), out=dst.numpy())
    else:
        dst.copy_(src * src)


def _top_lists(m: _Distances, k_top: int, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``(top (N, k_top), colmax (N,))``. Rows of d are columns of M, squared on the way in the
    input precision, then cast to float32 and divided by the row maximum (the column maximum of M², as
    torchreid); each row's stable top list follows (ties: lower index)."""
    n, n_q = m.n, m.n_q
    top = torch.empty(n, k_top, dtype=torch.long, device=m.dev)
    colmax = torch.empty(n, dtype=torch.float32, device=m.dev)
    width = max(1, min(rows, 512))
    rowbuf = torch.full((width, padded_width(n)), float("inf"), dtype=torch.float32, device=m.dev)
    for lo, hi in ((0, n_q), (n_q, n)):
        for a in range(lo, hi, width):
            b = min(hi, a + width)
            d = rowbuf[: b - a]
            if b <= n_q:
                _square_transposed(d[:, :n_q], m.qq[:, a:b])
                _square_into(d[:, n_q:n], m.qg[a:b])
            else:
                _square_transposed(d[:, :n_q], m.qg[:, a - n_q : b - n_q])
                _square_transposed(d[:, n_q:n], m.gg[:, a - n_q : b - n_q])
            colmax[a:b] = d[:, :n].amax(1)
            d[:, :n].div_(colmax[a:b, None])
            top[a:b] = stable_topk(d, k_top)[1]
    return top, colmax


def _sparse_v(m: _Distances, top_k: torch.Tensor, top_h: torch.Tensor, colmax: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2 and 3: the k-reciprocal sets R (at ``k1 + 1``, the columns of ``top_k``) and R½ (at
    ``round(k1/2) + 1``, ``top_h``) as masks over the top lists, each R expanded by the accepted R½ of
    its members, and the sparse rows of V over the expanded sets: ``(row, col, val)``, CSR order with
    columns ascending."""
    n, dev = m.n, m.dev
    kk, kh = top_k.shape[1], top_h.shape[1]
    recip = torch.empty(n, kk, dtype=torch.bool, device=dev)
    hrecip = torch.empty(n, kh, dtype=torch.bool, device=dev)
    step = max(1, (1 << 22) // (kk * kh * kk))
    for a in range(0, n, step):
        idx = torch.arange(a, min(n, a + step), device=dev)[:, None, None]
        recip[a : a + step] = (top_k[top_k[a : a + step]] == idx).any(-1)
        hrecip[a : a + step] = (top_h[top_h[a : a + step]] == idx).any(-1)
    v_row, v_col, v_val = [], [], []
    for a in range(0, n, step):
        s, sm = top_k[a : a + step], recip[a : a + step]
        cand, cm = top_h[s], hrecip[s]  # (c, kk, kh)
        r_sorted = torch.where(sm, s, torch.full_like(s, n)).sort(1).values  # R(i), padded with n
        flat_c = cand.reshape(s.shape[0], -1)
        pos = torch.searchsorted(r_sorted, flat_c).clamp_max(kk - 1)
        in_r = (r_sorted.gather(1, pos) == flat_c).view(cand.shape)  # cand ∈ R(i)
        inter = (in_r & cm).sum(-1).to(torch.float64)
        accept = sm & (inter > 2.0 / 3 * cm.sum(-1).to(torch.float64))
        e = torch.cat([s, cand.flatten(1)], 1)
        em = torch.cat([sm, (cm & accept[..., None]).flatten(1)], 1)
        e = torch.where(em, e, torch.full_like(e, n)).sort(1).values
        first = (e < n) & torch.cat([torch.ones_like(e[:, :1], dtype=torch.bool), e[:, 1:] != e[:, :-1]], 1)
        r_loc, pos = first.nonzero(as_tuple=True)
        i, j = r_loc + a, e[r_loc, pos]
        w = torch.exp(-m.d_at(colmax, i, j))
        total = torch.zeros(s.shape[0], dtype=torch.float32, device=dev).index_add_(0, r_loc, w)
        v_row.append(i), v_col.append(j), v_val.append(w / total[r_loc])
    return torch.cat(v_row), torch.cat(v_col), torch.cat(v_val)


def _csr(row: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(count, start)`` of each of the ``n`` rows of sorted CSR entries."""
    cnt = torch.bincount(row, minlength=n)
    return cnt, torch.cumsum(cnt, 0) - cnt


def _local_query_expansion(row: torch.Tensor, col: torch.Tensor, val: torch.Tensor, neighbours: torch.Tensor,
                           k2: int, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4: ``V[i] <- mean of V over its k2 nearest`` (``neighbours``: the (N, k2) top lists, flat),
    summed sparsely in neighbour order, then divided by ``k2``."""
    cnt, start = _csr(row, n)
    owner, p = _segments(start[neighbours], cnt[neighbours])
    key = (owner // k2) * n + col[p]
    order = torch.sort(key, stable=True).indices
    uniq, inv = torch.unique_consecutive(key[order], return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float32, device=row.device).index_add_(0, inv, val[p][order])
    return uniq // n, uniq % n, sums / k2


def _jaccard_blend(m: _Distances, row: torch.Tensor, col: torch.Tensor, val: torch.Tensor, colmax: torch.Tensor,
                   lambda_value: float) -> np.ndarray:
    """Steps 5 and 6: the Jaccard distance of each query row of V to each gallery row, through the
    inverted index of gallery rows (entries grouped by column), blended with d: ``(Q, G)`` float32."""
    n_q, n_g, n, dev = m.n_q, m.n_g, m.n, m.dev
    cnt, start = _csr(row, n)
    gsel = row >= n_q
    g_order = torch.sort(col[gsel], stable=True).indices
    g_row, g_col, g_val = (row[gsel] - n_q)[g_order], col[gsel][g_order], val[gsel][g_order]
    col_cnt = torch.bincount(g_col, minlength=n)
    col_start = torch.cumsum(col_cnt, 0) - col_cnt
    q_work = torch.zeros(n_q, dtype=torch.long, device=dev).index_add_(0, row[~gsel], col_cnt[col[~gsel]])
    out = np.empty((n_q, n_g), dtype=np.float32)
    out_t = torch.from_numpy(out)
    for a, b in _chunks_by_work(q_work.cpu().numpy(), max_rows=max(1, (1 << 22) // n_g)):
        o = out_t[a:b] if dev.type == "cpu" else torch.empty((b - a, n_g), dtype=torch.float32, device=dev)
        # where V_i and V_j share no column the Jaccard distance is exactly 1: (1 − λ)·1 + λ·d
        _square_into(o, m.qg[a:b])
        o.div_(colmax[a:b, None]).mul_(lambda_value).add_(1 - lambda_value)
        # elsewhere Σ_k min(V_ik, V_jk) through the inverted index, summed in column order like torchreid
        ents = torch.arange(int(start[a]), int(start[b - 1] + cnt[b - 1]), device=dev)
        owner, p = _segments(col_start[col[ents]], col_cnt[col[ents]])
        key = (row[ents][owner] - a) * n_g + g_row[p]
        uniq, inv = torch.unique(key, return_inverse=True)
        temp = torch.zeros(uniq.numel(), dtype=torch.float32, device=dev).index_add_(
            0, inv, torch.minimum(val[ents][owner], g_val[p]))
        jac = 1 - temp / (2.0 - temp)
        qi, gj = uniq // n_g + a, uniq % n_g
        o.view(-1)[uniq] = jac * (1 - lambda_value) + (_sq(m.qg[qi, gj]) / colmax[qi]) * lambda_value
        if dev.type != "cpu":
            out_t[a:b] = o.cpu()
    return out


def _chunks_by_work(work: np.ndarray, max_rows: int) -> list:
    """Consecutive [a, b) row ranges with Σ work ≤ _WORK (at least one row each) and at most max_rows rows."""
    bounds, a, acc = [], 0, 0
    for i, w in enumerate(work.tolist()):
        if i > a and (acc + w > _WORK or i - a >= max_rows):
            bounds.append((a, i))
            a, acc = i, 0
        acc += w
    bounds.append((a, len(work)))
    return bounds
