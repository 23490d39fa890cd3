"""The evaluator: embeds the evaluation data with a model and runs the recipe's protocol.

One implementation serves the trainer's periodic evaluation and ``deepmetric eval``. It composes the
pure metric functions of :mod:`deepmetric.evaluation`; it owns no formula.

Protocols (``eval.protocol``):
  - ``retrieval``: query set against gallery set, or leave-one-out on the query set;
  - ``reid``: CMC/mAP/mINP with same-identity-same-camera removal, optional re-ranking, optional
    centroid galleries (both tables reported);
  - ``verification``: LFW 10-fold on pairs, each image embedded with its horizontal flip and summed.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.base import DataSplits
from ..core.embeddings import EmbeddingSet
from ..core.results import EvalResult, PairScores, RetrievalResults
from .build import build_verification_pairs
from .extract import extract


class Evaluator:
    def __init__(self, cfg: Config, splits: DataSplits, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.splits = splits
        self.device = torch.device(device)
        self._pairs = None
        p = cfg.eval.protocol
        if p == "verification":
            self._pairs = splits.pairs or build_verification_pairs(cfg)
            if self._pairs is None:
                raise ConfigError("eval.protocol=verification needs pairs: a verification format "
                                  "(data.format=lfw) or eval.lfw_root and eval.lfw_pairs")
        elif splits.query is None:
            raise ConfigError(f"eval.protocol={p}: data.format '{cfg.data.format}' gives no query split")
        if p == "reid" and (splits.gallery is None or splits.query.camids is None):
            raise ConfigError("eval.protocol=reid needs query and gallery splits with camera ids "
                              "(data.format market1501 or dukemtmc, or a csv with a camera column)")

    def check_metric(self, metric: str, key: str = "eval.metric") -> None:
        """Refuse, before any training, a metric this protocol does not compute (a typo in
        ``eval.metric``, or ``centroid_map`` without ``eval.centroids``)."""
        names = self.metric_names()
        if metric not in names:
            import difflib

            close = difflib.get_close_matches(metric, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{key}: '{metric}' is not a metric of eval.protocol={self.cfg.eval.protocol}{hint} "
                              f"(computed: {', '.join(names)})")

    def metric_names(self) -> list:
        """The metric names this evaluation computes (higher-is-better scores and counts), found by
        running the protocol on eight toy vectors: the same code, so the list cannot drift."""
        import warnings

        g = torch.Generator().manual_seed(0)
        toy = EmbeddingSet(torch.randn(8, 4, generator=g), np.repeat(np.arange(4), 2), np.tile([0, 1], 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = self.cfg.eval.protocol
            if p == "verification":
                from ..evaluation import verification_metrics

                d = torch.rand(40, generator=g).numpy() * 4
                metrics = verification_metrics(d, np.arange(40) % 2 == 0)
            elif p == "reid":
                metrics = self._reid(toy, toy).metrics
            else:
                metrics = self._retrieval(toy, None, all_ks=True).metrics
        return [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]

    def _embed(self, model, dataset, flip: bool = False) -> EmbeddingSet:
        """Embed ``dataset``; under DDP each rank embeds every W-th item and the parts are gathered."""
        from ..core.distributed import dist_info, gather_embeddings

        info = dist_info()
        kw = dict(batch_size=self.cfg.data.eval_batch_size, device=self.device, flip=flip,
                  num_workers=self.cfg.data.num_workers, pin_memory=self.cfg.data.pin_memory,
                  normalize_on_device=self.cfg.data.normalize_on_device,
                  amp=self.cfg.train.amp)
        if not info.is_distributed:
            return extract(model, dataset, **kw)
        mine = np.arange(info.rank, len(dataset), info.world_size)
        part = extract(model, dataset.subset(mine), **kw)
        comm = self.device if self.device.type == "cuda" else torch.device("cpu")
        vectors, _ = gather_embeddings(part.vectors.to(comm), torch.as_tensor(part.labels, device=comm),
                                       torch.as_tensor(mine, device=comm))
        return EmbeddingSet(vectors.cpu(), dataset.labels, dataset.camids, dataset.paths)

    def evaluate(self, model: torch.nn.Module) -> Dict[str, Any]:
        return self.run(model, neighbours=False).metrics

    def run(self, model: torch.nn.Module, neighbours: bool = True) -> EvalResult:
        """Metrics, embeddings and (with ``neighbours``) each query's top-5 for the report's grids."""
        p = self.cfg.eval.protocol
        if p == "verification":
            return self._verification(model)
        query = self._embed(model, self.splits.query, flip=self.cfg.eval.flip)
        gallery = None if self.splits.gallery is None else self._embed(model, self.splits.gallery, flip=self.cfg.eval.flip)
        if self.cfg.eval.query_expansion is not None:
            query, gallery = expand_queries(query, gallery, self.cfg.eval.query_expansion)
        result = self._reid(query, gallery) if p == "reid" else self._retrieval(query, gallery)
        if neighbours:
            result.neighbours = top_neighbours(query, gallery, self.cfg.eval.distance)
        return result

    def _retrieval(self, query: EmbeddingSet, gallery: Optional[EmbeddingSet], all_ks: bool = False) -> EvalResult:
        from ..evaluation import retrieval_metrics

        c = self.cfg.eval
        n_ref = len(query) - 1 if gallery is None else len(gallery)
        ks = tuple(k for k in c.ks if all_ks or k <= max(n_ref, 1))
        metrics = retrieval_metrics(query.vectors, query.labels,
                                    None if gallery is None else gallery.vectors,
                                    None if gallery is None else gallery.labels,
                                    ks=ks, distance=c.distance)
        return EvalResult(metrics, query, gallery, protocol="retrieval")

    def _reid(self, query: EmbeddingSet, gallery: EmbeddingSet) -> EvalResult:
        from ..evaluation import reid_metrics_from_embeddings

        c = self.cfg.eval
        metrics = reid_metrics_from_embeddings(query, gallery, distance=c.distance, max_rank=c.max_rank,
                                               rerank=c.rerank)
        metrics = {k: v for k, v in metrics.items()}
        if c.centroids:  # Centroids-ReID: per query camera, each pid's centroid from its other cameras
            from ..evaluation import centroid_gallery, reid_metrics_centroids

            cameras = np.unique(query.camids) if query.camids is not None else None
            gallery_c = centroid_gallery(gallery, cameras, camera_aware=cameras is not None)
            cen = reid_metrics_centroids(query, gallery_c, distance=c.distance, max_rank=c.max_rank)
            metrics.update({f"centroid_{k}": v for k, v in cen.items()})
        return EvalResult(metrics, query, gallery, protocol="reid")

    def _verification(self, model) -> EvalResult:
        from ..evaluation import verification_metrics

        pairs = self._pairs
        emb = self._embed(model, pairs.images, flip=True)
        v = torch.nn.functional.normalize(emb.vectors.float(), dim=1)
        dist = ((v[pairs.left] - v[pairs.right]) ** 2).sum(1).numpy()
        metrics = verification_metrics(dist, np.asarray(pairs.is_same, dtype=bool))
        return EvalResult(metrics, emb, None, protocol="verification",
                          pairs=PairScores(dist, np.asarray(pairs.is_same, dtype=bool)))


def expand_queries(query: EmbeddingSet, gallery: Optional[EmbeddingSet], qe) -> tuple:
    """``eval.query_expansion``: the same sets with expanded vectors (queries and gallery together)."""
    from dataclasses import replace

    from ..evaluation import average_query_expansion

    out = average_query_expansion(query.vectors, None if gallery is None else gallery.vectors,
                                  k=qe.k, alpha=qe.alpha, times=qe.times)
    if gallery is None:
        return replace(query, vectors=out), None
    return replace(query, vectors=out[0]), replace(gallery, vectors=out[1])


def top_neighbours(query: EmbeddingSet, gallery: Optional[EmbeddingSet], distance: str, k: int = 5,
                   chunk: int = 1024) -> RetrievalResults:
    """Each query's top ``k`` (self excluded in leave-one-out), for the report's retrieval grids."""
    from ..evaluation import retrieval_results

    return retrieval_results(query.vectors, query.labels, None if gallery is None else gallery.vectors,
                             None if gallery is None else gallery.labels, k=k, distance=distance, chunk_size=chunk)
