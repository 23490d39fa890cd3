"""Exact, chunked nearest-neighbour primitives shared by every metric.

Everything here works on chunks of ``chunk_size`` query rows against the whole gallery, so memory is
O(chunk_size × N), never N × N, and it runs where the query tensor lives (CPU or CUDA).

Ranking keys
    A distance is ranked through a *key* that orders each row exactly as the distance does and costs one
    matrix product (the per-query constant ``‖q‖²`` is left out of the Euclidean key):

    ===================  ======================  ==========================
    distance             key(q, g)               distance from the key
    ===================  ======================  ==========================
    ``cosine``           −⟨q/‖q‖, g/‖g‖⟩         1 + key
    ``euclidean``        ‖g‖² − 2⟨q, g⟩          sqrt(max(key + ‖q‖², 0))
    ``squared_euclidean`` ‖g‖² − 2⟨q, g⟩          max(key + ‖q‖², 0)
    ===================  ======================  ==========================

Tie rule (pinned, used by every function of :mod:`deepmetric.evaluation`)
    Items with equal keys are ordered by gallery index, lower index first: the order of a *stable*
    argsort of the row. Results are deterministic and exact duplicates of a vector always tie. Ties are
    decided on the computed float keys; two distances equal in exact arithmetic but rounded differently
    are not a tie.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..core.distances import DISTANCES

__all__ = ["DISTANCES", "RankingKeys", "pairwise_distances", "topk_neighbors", "stable_topk", "member_ranks",
           "encode_labels", "LabelGroups", "chunked_member_ranks"]

ArrayLike = Union[np.ndarray, torch.Tensor]
BLOCK = 64  # key rows are padded to a multiple of BLOCK columns (+inf) and screened block by block
_CHUNK_ELEMENTS = 1 << 24  # default chunk: about 16M keys (64 MB in float32) per query chunk
_CANDIDATE_BUDGET = 1 << 22  # candidates sorted at once; a chunk with more is re-run a few rows at a time


def as_matrix(x: ArrayLike, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """``x`` as a 2-D floating tensor (float32, or float64 when given float64), on ``device`` if given."""
    t = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    return t


def as_matrix_pair(a: ArrayLike, b: ArrayLike, names: Tuple[str, str] = ("query", "gallery")
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` as matrices (:func:`as_matrix`), ``b`` on ``a``'s device and in its dtype;
    raises ``ValueError`` naming both when their dimensions ``D`` differ."""
    a_t = as_matrix(a, names[0])
    b_t = as_matrix(b, names[1], device=a_t.device).to(a_t.dtype)
    if a_t.shape[1] != b_t.shape[1]:
        raise ValueError(f"dimension mismatch: {names[0]} has D={a_t.shape[1]}, {names[1]} has D={b_t.shape[1]}")
    return a_t, b_t


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def default_chunk(num_items: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of query rows, got {chunk_size}")
        return int(chunk_size)
    return int(min(4096, max(16, _CHUNK_ELEMENTS // max(num_items, 1))))


def padded_width(n: int) -> int:
    return max(BLOCK, -(-n // BLOCK) * BLOCK)


class RankingKeys:
    """Ranking keys of query chunks against a fixed gallery (see the module docstring).

    ``keys(q)`` returns a ``(c, padded_width(N))`` tensor whose columns past ``N`` are ``+inf``; with
    ``out`` it writes into a preallocated buffer (reusing it avoids re-faulting fresh memory per chunk).
    """

    def __init__(self, gallery: torch.Tensor, distance: str) -> None:
        check_distance(distance)
        self.distance = distance
        self.n = int(gallery.shape[0])
        self.width = padded_width(self.n)
        g = F.normalize(gallery, dim=1) if distance == "cosine" else gallery
        gt = torch.zeros(gallery.shape[1], self.width, dtype=gallery.dtype, device=gallery.device)
        gt[:, : self.n] = -g.T if distance == "cosine" else g.T
        self._gt = gt
        self._bias: Optional[torch.Tensor] = None
        if distance != "cosine":
            bias = torch.full((self.width,), float("inf"), dtype=gallery.dtype, device=gallery.device)
            bias[: self.n] = (g * g).sum(1)
            self._bias = bias

    def keys(self, q: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = q.to(device=self._gt.device, dtype=self._gt.dtype)
        if out is None:
            out = torch.empty(q.shape[0], self.width, dtype=self._gt.dtype, device=self._gt.device)
        if self.distance == "cosine":
            torch.mm(F.normalize(q, dim=1), self._gt, out=out)
            out[:, self.n :] = float("inf")
        else:
            torch.addmm(self._bias, q, self._gt, alpha=-2.0, out=out)
        return out

    def to_distance(self, keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """True distances from keys (same shape as ``keys``)."""
        if self.distance == "cosine":
            return keys + 1.0
        sq = (keys + (q * q).sum(1, keepdim=True).to(keys.dtype)).clamp_min(0.0)
        return sq.sqrt() if self.distance == "euclidean" else sq


def pairwise_distances(a: ArrayLike, b: ArrayLike, distance: str = "euclidean",
                       chunk_size: Optional[int] = None) -> torch.Tensor:
    """Dense ``(Na, Nb)`` distance matrix (on ``a``'s device), computed by chunks of rows of ``a``.

    >>> pairwise_distances(np.eye(2), np.array([[1.0, 0.0]]), "squared_euclidean").tolist()
    [[0.0], [2.0]]
    """
    a_t, b_t = as_matrix_pair(a, b, ("a", "b"))
    rk = RankingKeys(b_t, distance)
    out = torch.empty(a_t.shape[0], b_t.shape[0], dtype=a_t.dtype, device=a_t.device)
    step = default_chunk(rk.width, chunk_size)
    for r0 in range(0, a_t.shape[0], step):
        q = a_t[r0 : r0 + step]
        out[r0 : r0 + step] = rk.to_distance(rk.keys(q)[:, : rk.n], q)
    return out


def stable_topk(keys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest keys of each row, ordered by (key, column): a stable argsort's first ``k``.

    When the width is a multiple of ``BLOCK`` and much larger than ``k``, only the k+1 column blocks with the
    smallest minima are searched (they hold every key up to the (k+1)-th smallest; rows where another block
    ties that bound are searched in full).
    """
    c, w = keys.shape
    kb = k + 1
    if w % BLOCK or kb * BLOCK * 4 > w:
        return _stable_topk_dense(keys, k)
    nb = w // BLOCK
    bmin = keys.view(c, nb, BLOCK).amin(2)
    bv, bi = bmin.topk(kb, dim=1, largest=False, sorted=True)
    exact = (bmin <= bv[:, -1:]).sum(1) == kb
    bi = bi.sort(1).values  # ascending blocks: gathered columns keep the global column order
    rows = torch.arange(c, device=keys.device)[:, None]
    vals = keys.view(c * nb, BLOCK).index_select(0, (rows * nb + bi).view(-1)).view(c, kb * BLOCK)
    cols = (bi[:, :, None] * BLOCK + torch.arange(BLOCK, device=keys.device)).view(c, kb * BLOCK)
    v, i = _stable_topk_dense(vals, k)
    i = cols.gather(1, i)
    if not bool(exact.all()):
        redo = (~exact).nonzero()[:, 0]
        v[redo], i[redo] = _stable_topk_dense(keys[redo], k)
    return v, i


def _stable_topk_dense(keys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One ``topk(k + 1)`` settles every row whose k-th and (k+1)-th keys differ (the set is then exact and
    only its order needs fixing); rows with a tie across that boundary take the exact candidate path."""
    c, n = keys.shape
    if k < n:
        v, i = keys.topk(k + 1, dim=1, largest=False, sorted=True)
        v, i, clean = v[:, :k], i[:, :k], v[:, k] > v[:, k - 1]
        o = torch.sort(i, dim=1).indices
        o = o.gather(1, torch.sort(v.gather(1, o), dim=1, stable=True).indices)  # (key, column) order
        v, i = v.gather(1, o), i.gather(1, o)
        if bool(clean.all()):
            return v, i
        dirty = (~clean).nonzero()[:, 0]
        v[dirty], i[dirty] = _stable_topk_exact(keys[dirty], k)
        return v, i
    return _stable_topk_exact(keys, k)


def _stable_topk_exact(keys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    c = keys.shape[0]
    kth = keys.topk(k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    r, g = (keys <= kth).nonzero(as_tuple=True)  # every tie at the k-th key is a candidate
    v = keys[r, g]
    order = _lexsort_rows(r, v)
    r, g, v = r[order], g[order], v[order]
    counts = torch.bincount(r, minlength=c)
    pos = torch.arange(r.numel(), device=r.device) - (torch.cumsum(counts, 0) - counts)[r]
    keep = pos < k
    return v[keep].view(c, k), g[keep].view(c, k)


def topk_neighbors(query: ArrayLike, gallery: Optional[ArrayLike] = None, k: int = 10, distance: str = "cosine",
                   chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest gallery items of each query: ``(distances (Q, k), indices (Q, k) int64)``.

    ``gallery=None`` searches the query set itself, leaving each query out by index. Ties follow the
    module's rule (lower gallery index first). ``k`` is capped at the number of searchable items.

    >>> d, i = topk_neighbors(np.array([[0.0], [1.0], [3.0]]), k=1, distance="euclidean")
    >>> i.ravel().tolist(), d.ravel().tolist()
    ([1, 0, 1], [1.0, 1.0, 2.0])
    """
    q, g = (as_matrix(query, "query"),) * 2 if gallery is None else as_matrix_pair(query, gallery)
    if g.shape[0] == 0 or q.shape[0] == 0:
        raise ValueError("topk_neighbors: empty query or gallery")
    k = min(int(k), g.shape[0] - (gallery is None))
    if k < 1:
        raise ValueError("topk_neighbors: k must be >= 1 and the gallery must hold at least one other item")
    rk = RankingKeys(g, distance)
    step = default_chunk(rk.width, chunk_size)
    dists, idxs = [], []
    buf = None
    for r0 in range(0, q.shape[0], step):
        qc = q[r0 : r0 + step]
        if buf is None or buf.shape[0] < qc.shape[0]:
            buf = torch.empty(qc.shape[0], rk.width, dtype=g.dtype, device=g.device)
        keys = rk.keys(qc, out=buf[: qc.shape[0]])
        if gallery is None:
            rows = torch.arange(qc.shape[0], device=keys.device)
            keys[rows, rows + r0] = float("inf")
        v, i = stable_topk(keys, k)
        dists.append(rk.to_distance(v, qc))
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def encode_labels(*labels: ArrayLike) -> Tuple[list, int]:
    """Map any labels (ints of any size, strings) to dense int64 codes shared across the arrays.

    Comparison is exact: labels are never cast to float (PML's AccuracyCalculator does, and merges
    integer labels above 2**24).
    """
    arrays = [np.asarray(x.detach().cpu() if torch.is_tensor(x) else x).reshape(-1) for x in labels]
    uniq, inv = np.unique(np.concatenate(arrays), return_inverse=True)
    inv = inv.astype(np.int64)
    out, start = [], 0
    for a in arrays:
        out.append(inv[start : start + len(a)])
        start += len(a)
    return out, len(uniq)


class LabelGroups:
    """Gallery indices grouped by label code (CSR), ascending index within each group."""

    def __init__(self, codes: np.ndarray, num_codes: int, device: torch.device) -> None:
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=num_codes)
        self.order = torch.as_tensor(order, dtype=torch.long, device=device)
        self.counts = torch.as_tensor(counts, dtype=torch.long, device=device)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def members(self, query_codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(members (c, R) int64, valid (c, R) bool)``: each query's same-label gallery items, padded with -1."""
        cnt = self.counts[query_codes]
        width = int(cnt.max()) if cnt.numel() else 0
        ar = torch.arange(width, device=cnt.device)
        valid = ar < cnt[:, None]
        pos = (self.starts[query_codes][:, None] + ar).clamp_max(max(len(self.order) - 1, 0))
        members = torch.where(valid, self.order[pos], torch.full_like(pos, -1)) if width else pos
        return members, valid


def _candidates(keys: torch.Tensor, hi: torch.Tensor):
    """All (row, column, key) with key <= hi[row], in (row, column) order. Column blocks are screened by their
    minimum key first when few qualify, else one elementwise pass."""
    c, width = keys.shape
    nb = width // BLOCK
    bmask = keys.view(c, nb, BLOCK).amin(2) <= hi[:, None]
    if int(bmask.sum()) * 2 < bmask.numel():
        sel = bmask.view(-1).nonzero()[:, 0]  # flat block ids, row-major
        sel_row = sel // nb
        vals = keys.view(-1, BLOCK).index_select(0, sel)
        flat = (vals <= hi[sel_row, None]).view(-1).nonzero()[:, 0]
        blk = flat // BLOCK
        return sel_row[blk], (sel - sel_row * nb)[blk] * BLOCK + (flat - blk * BLOCK), vals.view(-1)[flat]
    flat = (keys <= hi[:, None]).view(-1).nonzero()[:, 0]
    return flat // width, flat % width, keys.view(-1)[flat]


def _lexsort_rows(rows: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Stable order by (row, value) of entries given in (row, column) order, so ties keep column order."""
    if vals.dtype == torch.float32:  # one radix sort of (row << 32 | order-preserving bits of the float)
        bits = (vals + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0: they tie
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)
        return torch.sort((rows << 32) | bits, stable=True).indices
    o1 = torch.sort(vals, stable=True).indices
    return o1[torch.sort(rows[o1], stable=True).indices]


def _count_before_by_candidates(keys, members, relevant, hi, budget):
    """#items before each relevant member: sort only the items up to the row's farthest relevant key (all
    of which precede or are a relevant member), then read each member's position. None if over budget."""
    rr, cols, vv = _candidates(keys, hi)
    m = rr.numel()
    if budget is not None and m > budget:
        return None
    c, width = keys.shape
    order = _lexsort_rows(rr, vv)
    position = torch.empty_like(order)
    position[order] = torch.arange(m, device=keys.device)
    counts = torch.bincount(rr, minlength=c)
    row_start = torch.cumsum(counts, 0) - counts
    r_idx, slot = relevant.nonzero(as_tuple=True)
    where = torch.searchsorted(rr * width + cols, r_idx * width + members[r_idx, slot])
    before = torch.zeros(members.shape, dtype=torch.long, device=keys.device)
    before[r_idx, slot] = position[where] - row_start[r_idx]
    return before


def _ignored_before(mk, members, valid, ignored):
    """For each member, how many *ignored* members of its row precede it in (key, index) order."""
    big = torch.iinfo(torch.long).max
    idx = torch.where(valid, members, torch.full_like(members, big))
    mkv = torch.where(valid, mk, torch.full_like(mk, float("inf")))
    o1 = torch.sort(idx, dim=1, stable=True).indices
    order = o1.gather(1, torch.sort(mkv.gather(1, o1), dim=1, stable=True).indices)
    ign = ignored.gather(1, order).long()
    return torch.empty_like(ign).scatter_(1, order, torch.cumsum(ign, 1) - ign)


def member_ranks(keys: torch.Tensor, members: torch.Tensor, valid: torch.Tensor, relevant: torch.Tensor,
                 num_items: int) -> torch.Tensor:
    """0-based rank of each relevant member in its row's ranking, with the row's ignored members removed.

    ``keys`` is ``(c, W)`` (columns ``>= num_items`` are padding, ``+inf``, ``W`` a multiple of ``BLOCK``);
    ``members (c, R)`` are column indices (-1 = padding) of the row's same-label items; ``valid`` marks real
    members; ``relevant ⊆ valid`` the ones to rank; ``valid & ~relevant`` members are *ignored*: removed from
    the ranking (the query itself in leave-one-out, same-camera images in re-ID). Returns ``(c, R)`` int64,
    -1 where not relevant::

        rank_i = #{g : (key_g, g) < (key_i, j_i)} − #{ignored m : (key_m, m) < (key_i, j_i)}

    Only the items up to the row's farthest relevant key can precede a relevant member: they are found by
    screening column blocks on their minimum key and ordered by one radix sort of (row, key) — exact, and
    cheap next to the key matrix when relevant items rank high; rows where many items qualify are handled a
    few at a time.
    """
    c, R = members.shape
    out = torch.full((c, R), -1, dtype=torch.long, device=keys.device)
    if R == 0 or not bool(relevant.any()):
        return out
    mk = keys.gather(1, members.clamp_min(0))
    hi = torch.where(relevant, mk, torch.full_like(mk, float("-inf"))).amax(1)
    hi = torch.where(relevant.any(1), hi, torch.full_like(hi, float("nan")))  # NaN selects no block
    before = _count_before_by_candidates(keys, members, relevant, hi, _CANDIDATE_BUDGET)
    if before is None:  # many items rank above some relevant item: a few rows at a time, all of them sorted
        step = max(1, _CANDIDATE_BUDGET // max(num_items, 1))
        before = torch.cat([_count_before_by_candidates(keys[s : s + step], members[s : s + step],
                                                        relevant[s : s + step], hi[s : s + step], None)
                            for s in range(0, c, step)])
    ignored = valid & ~relevant
    if bool(ignored.any()):
        before = before - _ignored_before(mk, members, valid, ignored)
    return torch.where(relevant, before, out)


KeyFn = Callable[[int, int], torch.Tensor]
IgnoreFn = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def chunked_member_ranks(key_fn: KeyFn, num_queries: int, num_items: int, query_codes: np.ndarray,
                         groups: LabelGroups, ignore_fn: Optional[IgnoreFn], chunk_size: int,
                         device: torch.device) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(r0, r1, ranks, relevant)`` per chunk of query rows; see :func:`member_ranks`.

    ``key_fn(r0, r1)`` returns the ``(r1 - r0, W)`` keys of those queries; ``ignore_fn(r0, r1, members,
    valid)`` returns the members to remove from each row's ranking (None: remove nothing).
    """
    codes = torch.as_tensor(query_codes, dtype=torch.long, device=device)
    for r0 in range(0, num_queries, chunk_size):
        r1 = min(num_queries, r0 + chunk_size)
        keys = key_fn(r0, r1)
        members, valid = groups.members(codes[r0:r1])
        ignored = ignore_fn(r0, r1, members, valid) if ignore_fn is not None else torch.zeros_like(valid)
        relevant = valid & ~ignored
        yield r0, r1, member_ranks(keys, members, valid, relevant, num_items), relevant


class _Buffer:
    """One reusable (rows, width) buffer: writing into warm memory beats allocating each chunk."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, fill: float = float("inf")) -> None:
        self.width, self.dtype, self.device, self.fill, self.t = width, dtype, device, fill, None

    def get(self, rows: int) -> torch.Tensor:
        if self.t is None or self.t.shape[0] < rows:
            self.t = torch.full((rows, self.width), self.fill, dtype=self.dtype, device=self.device)
        return self.t[:rows]


def matrix_key_fn(distances: torch.Tensor) -> Tuple[KeyFn, int]:
    """Key source over a precomputed ``(Q, G)`` distance matrix: rows copied into a +inf-padded buffer."""
    n = distances.shape[1]
    buf = _Buffer(padded_width(n), distances.dtype, distances.device)

    def key_fn(r0: int, r1: int) -> torch.Tensor:
        out = buf.get(r1 - r0)
        out[:, :n] = distances[r0:r1]
        if bool(torch.isnan(out[:, :n]).any()):
            raise ValueError(f"distances contain NaN in query rows {r0}..{r1 - 1}")
        return out

    return key_fn, buf.width


def embedding_key_fn(query: torch.Tensor, rk: RankingKeys) -> KeyFn:
    buf = _Buffer(rk.width, rk._gt.dtype, rk._gt.device)
    return lambda r0, r1: rk.keys(query[r0:r1], out=buf.get(r1 - r0))


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def as_labels(x: ArrayLike, n: int, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x)
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per row), got shape {a.shape}")
    return a
