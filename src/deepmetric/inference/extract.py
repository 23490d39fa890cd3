"""Embeddings as data: :class:`EmbeddingSet` and :func:`extract` (model + dataset -> vectors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class EmbeddingSet:
    """Vectors with what is known about each: ``vectors (N, D) float``, ``labels (N,) int64``,
    optional ``camids (N,) int64`` and ``paths`` (N strings).

    The hand-off object between embedding, evaluation and search: metrics read labels and camera ids
    from it, the search index keeps its paths and labels as hit metadata.
    """

    vectors: torch.Tensor
    labels: np.ndarray
    camids: Optional[np.ndarray] = None
    paths: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.vectors):
            self.vectors = torch.as_tensor(np.asarray(self.vectors))
        if self.vectors.ndim != 2:
            raise ValueError(f"EmbeddingSet.vectors must be (N, D), got shape {tuple(self.vectors.shape)}")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = self.vectors.shape[0]
        if len(self.labels) != n:
            raise ValueError(f"EmbeddingSet: {len(self.labels)} labels for {n} vectors")
        if self.camids is not None:
            self.camids = np.asarray(self.camids, dtype=np.int64).reshape(-1)
            if len(self.camids) != n:
                raise ValueError(f"EmbeddingSet: {len(self.camids)} camera ids for {n} vectors")
        if self.paths is not None:
            self.paths = [str(p) for p in self.paths]
            if len(self.paths) != n:
                raise ValueError(f"EmbeddingSet: {len(self.paths)} paths for {n} vectors")

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@torch.no_grad()
def extract(model: torch.nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu",
            flip: bool = False, num_workers: int | str = 0, progress: bool = False, amp: str = "off",
            pin_memory: bool | str = "auto", normalize_on_device: bool | str = "auto") -> EmbeddingSet:
    """Embed every item of a :class:`~deepmetric.data.MetricDataset` (in order) into an :class:`EmbeddingSet`.

    ``flip=True`` adds the embedding of the horizontally flipped image before normalising (the face
    verification protocol: embed both, sum, L2-normalise). ``num_workers``/``pin_memory`` take
    numbers/booleans or ``"auto"`` (see :func:`deepmetric.data.loading.loader_settings`), and
    ``normalize_on_device`` moves the final normalisation to ``device`` (see
    :func:`deepmetric.data.loading.normalisation_on_device`; ``auto`` = on CUDA).
    """
    from torch.utils.data import DataLoader

    from ..data.loading import loader_settings, normalisation_on_device

    device = torch.device(device)
    was_training = model.training
    model.eval()
    settings = loader_settings(num_workers, pin_memory, device, persistent=False)
    dataset, batch_normalize = normalisation_on_device(dataset, normalize_on_device, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **settings.kwargs())
    chunks = []
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="embed", unit="batch", leave=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    for images, _, _ in it:
        images = images.to(device, non_blocking=True)
        if batch_normalize is not None:
            images = batch_normalize(images)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            emb = model(images).float()
            if flip:
                emb = emb + model(torch.flip(images, dims=[3])).float()
                emb = torch.nn.functional.normalize(emb, dim=1)
        chunks.append(emb.cpu())
    model.train(was_training)
    vectors = torch.cat(chunks) if chunks else torch.empty(0, getattr(model, "embedding_dim", 0))
    return EmbeddingSet(vectors, dataset.labels, dataset.camids, dataset.paths)
