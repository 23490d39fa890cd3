"""Centroid galleries (Centroids-ReID, Wieczorek et al. 2021): each identity is represented by the mean of its
un-normalised gallery embeddings, and queries are ranked against those means.

Camera-aware protocol, done correctly and cleanly. For a query of pid p seen by camera c, the per-image
re-ID protocol keeps every gallery image except pid p's images from camera c. Its centroid counterpart here:
the query sees **one centroid per pid**, built from exactly the images the per-image protocol would let it
see —

- pid p (its own): the mean of p's gallery images from cameras ≠ c (none left → the query is skipped);
- every other pid: the mean of all its gallery images (same-camera negatives stay, as per image).

The reference (``centroids-reid`` ``validation_create_centroids`` / ``eval_func``) differs in two ways:
it indexes the query+gallery camera array with gallery indices (issue #41), so its camera filtering uses the
wrong cameras; and it keeps every camera-subset centroid of *other* pids in the ranking, so a negative pid
can occupy several ranks. Pid 0 distractors (Market-1501) collapse into one centroid, as in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ..core.embeddings import EmbeddingSet
from .neighbors import (ArrayLike, LabelGroups, RankingKeys, as_matrix_pair, check_distance, check_finite,
                        chunked_member_ranks, default_chunk, padded_width)
from .reid import summarize_reid
from .retrieval import collect_statistics


@dataclass
class CentroidGallery(EmbeddingSet):
    """Centroids as an :class:`EmbeddingSet` (``labels`` = pids, ``camids`` = None) plus, per centroid,
    ``excluded_camids (C,) int64`` (the camera whose images were left out; -1 = built from all cameras),
    ``counts (C,) int64`` (images averaged) and ``sole_camids (C,) int64`` (for an all-camera centroid whose
    images all come from one camera, that camera; else -1). The first ``num_pids`` rows are the all-camera
    centroids, one per pid in ascending pid order (``full()`` gives them as a search gallery); the
    camera-excluded ones follow, sorted by (pid, camera). ``query_cameras`` lists the cameras the gallery was
    built for (None: not camera-aware)."""

    excluded_camids: Optional[np.ndarray] = None
    counts: Optional[np.ndarray] = None
    sole_camids: Optional[np.ndarray] = None
    query_cameras: Optional[np.ndarray] = None

    @property
    def num_pids(self) -> int:
        return int(np.sum(self.excluded_camids < 0))

    def full(self) -> EmbeddingSet:
        """The all-camera centroids only: one vector per pid."""
        k = self.num_pids
        return EmbeddingSet(self.vectors[:k], self.labels[:k])


def centroid_gallery(gallery: EmbeddingSet, query_camids: Optional[ArrayLike] = None,
                     camera_aware: bool = False) -> CentroidGallery:
    """Per-pid centroids (mean of **un-normalised** gallery vectors) and, with ``camera_aware=True``, for each
    camera c in ``query_camids`` and each pid with images both in c and elsewhere, the mean of that pid's
    images from cameras ≠ c (a pid absent from c is served by its all-camera centroid; a pid seen only in
    c has none: its camera-c queries get skipped). Means are accumulated in float64.

    >>> g = EmbeddingSet(torch.tensor([[0.0], [2.0], [4.0]]), [5, 5, 5], camids=[0, 1, 1])
    >>> c = centroid_gallery(g, query_camids=[1], camera_aware=True)
    >>> c.vectors.ravel().tolist(), c.labels.tolist(), c.excluded_camids.tolist(), c.counts.tolist()
    ([2.0, 0.0], [5, 5], [-1, 1], [3, 1])
    """
    if len(gallery) == 0:
        raise ValueError("centroid_gallery: the gallery is empty")
    x = gallery.vectors.detach().to(torch.float64)
    pids, pid_idx = np.unique(gallery.labels, return_inverse=True)
    dev = x.device
    pid_t = torch.as_tensor(pid_idx, device=dev)
    counts = np.bincount(pid_idx, minlength=len(pids))
    sums = torch.zeros(len(pids), x.shape[1], dtype=torch.float64, device=dev).index_add_(0, pid_t, x)
    vecs = [sums / torch.as_tensor(counts, device=dev)[:, None]]
    labels, excl, cnts = [pids], [np.full(len(pids), -1)], [counts]
    cams = None
    if camera_aware:
        if query_camids is None or gallery.camids is None:
            raise ValueError("centroid_gallery(camera_aware=True) needs query_camids and gallery.camids")
        cams = np.unique(np.asarray(query_camids, dtype=np.int64))
        if (cams < 0).any():
            raise ValueError("camera ids must be >= 0 (-1 marks an all-camera centroid)")
        for c in cams.tolist():
            in_c = gallery.camids == c
            n_c = np.bincount(pid_idx[in_c], minlength=len(pids))
            keep = (n_c > 0) & (counts - n_c > 0)
            if not keep.any():
                continue
            in_c_t = torch.as_tensor(in_c, device=dev)
            sub = torch.zeros_like(sums).index_add_(0, pid_t[in_c_t], x[in_c_t])
            sel = torch.as_tensor(keep, device=dev)
            vecs.append((sums[sel] - sub[sel]) / torch.as_tensor(counts - n_c, device=dev)[sel][:, None])
            labels.append(pids[keep]), excl.append(np.full(int(keep.sum()), c)), cnts.append((counts - n_c)[keep])
    labels_a, excl_a = np.concatenate(labels), np.concatenate(excl)
    sole = np.full(len(labels_a), -1, dtype=np.int64)
    if gallery.camids is not None:
        cam_lo = np.full(len(pids), np.iinfo(np.int64).max)
        cam_hi = np.full(len(pids), np.iinfo(np.int64).min)
        np.minimum.at(cam_lo, pid_idx, gallery.camids)
        np.maximum.at(cam_hi, pid_idx, gallery.camids)
        sole[: len(pids)] = np.where(cam_lo == cam_hi, cam_lo, -1)
    order = np.lexsort((excl_a, labels_a, excl_a >= 0))  # all-camera block first, then by (pid, camera)
    vec = torch.cat(vecs)[torch.as_tensor(order, device=dev)]
    vec = vec.to(gallery.vectors.dtype if gallery.vectors.is_floating_point() else torch.float32)
    return CentroidGallery(vec, labels_a[order], excluded_camids=excl_a[order].astype(np.int64),
                           counts=np.concatenate(cnts)[order].astype(np.int64), sole_camids=sole[order],
                           query_cameras=cams)


def reid_metrics_centroids(query: EmbeddingSet, centroids: CentroidGallery, distance: str = "euclidean",
                           max_rank: int = 50, chunk_size: Optional[int] = None) -> Dict[str, object]:
    """Re-ID CMC / mAP / mINP of per-image queries against a :class:`CentroidGallery` (see the module docstring
    for which centroids each query sees: one per pid). Same outputs and rank formulas as
    :func:`~deepmetric.evaluation.reid_metrics`; ranks are among the P pid slots (ties: lower pid first).
    ``distance="cosine"`` ranks like centroids-reid (L2-normalised vectors, squared L2). A camera-aware
    gallery needs ``query.camids`` and must have been built for every camera they contain.

    >>> g = EmbeddingSet(torch.tensor([[0.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), [1, 1, 2], camids=[0, 1, 1])
    >>> q = EmbeddingSet(torch.tensor([[0.0, 2.9]]), [1], camids=[0])
    >>> reid_metrics_centroids(q, centroid_gallery(g, [0], camera_aware=True), max_rank=2)["cmc"]
    [1.0, 1.0]
    """
    check_distance(distance)
    q, cg = as_matrix_pair(query.vectors, centroids.vectors, ("query.vectors", "centroids.vectors"))
    if len(query) == 0 or len(centroids) == 0:
        raise ValueError("reid_metrics_centroids: empty query set or centroid gallery")
    check_finite(q, "query.vectors")
    n_p = centroids.num_pids
    pids = centroids.labels[:n_p]
    slot = np.searchsorted(pids, query.labels)
    has_pid = (slot < n_p) & (pids[np.minimum(slot, n_p - 1)] == query.labels)
    own_col = np.where(has_pid, slot, -1)  # column of the query's own centroid
    ignore_own = np.zeros(len(query), dtype=bool)
    if centroids.query_cameras is not None:  # camera-aware: swap in the camera-excluded centroid
        if query.camids is None:
            raise ValueError("a camera-aware centroid gallery needs query.camids")
        missing = np.setdiff1d(np.unique(query.camids), centroids.query_cameras)
        if len(missing):
            raise ValueError(f"query cameras {missing.tolist()} were not given to centroid_gallery(query_camids=...)")
        special = {(int(p), int(c)): i for i, (p, c) in enumerate(zip(centroids.labels, centroids.excluded_camids))
                   if c >= 0}
        for i in np.nonzero(has_pid)[0].tolist():
            cam = int(query.camids[i])
            col = special.get((int(query.labels[i]), cam))
            if col is not None:
                own_col[i] = col
            else:  # the pid is absent from this camera (all-camera centroid) or seen only here (nothing left)
                ignore_own[i] = centroids.sole_camids[slot[i]] == cam
    rk = RankingKeys(cg, distance)
    width = padded_width(n_p)
    own_t = torch.as_tensor(own_col, device=q.device)
    ignore_t = torch.as_tensor(ignore_own, device=q.device)

    def key_fn(r0: int, r1: int) -> torch.Tensor:
        full = rk.keys(q[r0:r1])
        keys = torch.full((r1 - r0, width), float("inf"), dtype=full.dtype, device=full.device)
        keys[:, :n_p] = full[:, :n_p]
        rows = torch.nonzero(own_t[r0:r1] >= 0)[:, 0]
        keys[rows, torch.as_tensor(slot[r0:r1], device=q.device)[rows]] = full[rows, own_t[r0:r1][rows]]
        return keys

    codes = np.where(has_pid, slot, n_p)  # code n_p: no centroid for this pid → no member, skipped
    groups = LabelGroups(np.arange(n_p), n_p + 1, q.device)
    chunks = chunked_member_ranks(key_fn, len(query), n_p, codes, groups,
                                  lambda r0, r1, m, v: v & ignore_t[r0:r1, None],
                                  default_chunk(width, chunk_size), q.device)
    return summarize_reid(collect_statistics(chunks), max(1, min(int(max_rank), n_p)), "reid_metrics_centroids")
