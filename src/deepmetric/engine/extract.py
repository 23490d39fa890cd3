"""Model + dataset -> :class:`~deepmetric.core.embeddings.EmbeddingSet`: :func:`extract`."""
from __future__ import annotations

import torch

from ..core.embeddings import EmbeddingSet


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
    # a test pipeline decodes and normalises image files in one step (the one test-time definition,
    # deepmetric.core.preprocessing), so `true` is taken as `auto`: split where the pipeline can
    setting = "auto" if normalize_on_device is True else normalize_on_device
    dataset, batch_normalize = normalisation_on_device(dataset, setting, device)
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
