"""Cross-batch memory (XBM, Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Loss


class CrossBatchMemory(Loss):
    """Wrap a pair loss with a ring buffer of past embeddings.

    ``xbm = CrossBatchMemory(build_loss("contrastive_xbm"), embedding_dim=128, size=55000,
    start_step=1000, weight=1.0)``; ``loss = xbm(embeddings, labels)`` each training step.

    One training forward (``self.training``):

    1. ``step += 1`` (so the first call is step 1).
    2. ``L = loss(embeddings, labels)``: the in-batch loss, gradients on both sides.
    3. If ``step > start_step``: enqueue ``embeddings.detach()`` *first* (so the memory holds the
       current batch, as the paper and PML do), then
       ``L += weight * loss(embeddings, labels, ref_embeddings=memory, ref_labels=memory_labels,
       ref_exclude=own slots)``; each query's own just-written copy is excluded, the rest of the
       memory (including the other images of this batch) is used, without gradient.

    Before ``start_step`` nothing is enqueued (the paper starts the memory once embeddings are stable).
    In eval mode only the in-batch loss is returned and no state changes.

    The memory is a ring: writes go to ``(ptr + arange(B)) % size``; ``filled`` counts valid slots,
    which are ``[0, filled)`` (a counter, not research-xbm's "last label != 0" test). All state is in
    buffers (``memory`` float32, ``memory_labels`` int64, ``ptr``, ``filled``, ``step`` int64), so a
    ``state_dict`` restores it exactly.

    ``kind = "pair"`` (it owns no class parameters), but it takes no reference set and cannot wrap
    another memory. Each training forward counts as one step (with gradient accumulation, count
    ``start_step`` in forwards).

    Difference from PML ``CrossBatchMemory``: PML returns only the memory term (no in-batch term, no
    weight, no delayed start); our :meth:`terms` exposes both terms, and ``terms()[1]`` equals PML's
    value on the same sequence of batches.
    """

    kind = "pair"

    def __init__(self, loss: nn.Module, embedding_dim: int, size: int, start_step: int = 0,
                 weight: float = 1.0):
        super().__init__()
        if isinstance(loss, CrossBatchMemory) or not isinstance(loss, Loss) or loss.kind != "pair":
            raise TypeError(
                f"CrossBatchMemory wraps one pair loss (kind == 'pair'); got {type(loss).__name__} "
                f"(kind={getattr(loss, 'kind', None)!r}). Classification losses own class weights and "
                "have no use for a memory of past embeddings; a memory cannot wrap another memory."
            )
        for key, value in (("embedding_dim", embedding_dim), ("size", size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CrossBatchMemory: {key} must be a positive int, got {value!r}")
        self.loss = loss
        self.embedding_dim, self.size = embedding_dim, size
        self.start_step, self.weight = int(start_step), float(weight)
        self.register_buffer("memory", torch.zeros(size, embedding_dim))
        self.register_buffer("memory_labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        """Empty the memory (the step counter is kept)."""
        self.memory.zero_()
        self.memory_labels.zero_()
        self.ptr.zero_()
        self.filled.zero_()

    def enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Write a batch into the ring; return the slots written, ``(B,)`` int64."""
        b = embeddings.shape[0]
        if b > self.size:
            raise ValueError(f"CrossBatchMemory: batch of {b} does not fit in a memory of size {self.size}")
        slots = (self.ptr + torch.arange(b, device=self.ptr.device)) % self.size
        self.memory[slots] = embeddings.detach().to(self.memory.dtype)
        self.memory_labels[slots] = labels.to(self.memory_labels.device, torch.long)
        self.ptr.copy_((self.ptr + b) % self.size)
        self.filled.copy_(torch.clamp(self.filled + b, max=self.size))
        return slots

    def memory_loss(self, embeddings: Tensor, labels: Tensor, own_slots: Optional[Tensor] = None) -> Tensor:
        """The wrapped loss of the batch against the valid part of the memory."""
        n = int(self.filled)
        exclude = None
        if own_slots is not None:
            exclude = torch.where(own_slots < n, own_slots, -1)
        return self.loss(embeddings, labels, ref_embeddings=self.memory[:n],
                         ref_labels=self.memory_labels[:n], ref_exclude=exclude)

    def terms(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Run one step's bookkeeping and return ``(in_batch_loss, memory_loss or None)``."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"CrossBatchMemory was built for embedding_dim={self.embedding_dim}; "
                f"got embeddings of shape {tuple(embeddings.shape)}"
            )
        if self.memory.device != embeddings.device:
            self.to(embeddings.device)
        in_batch = self.loss(embeddings, labels)
        if not self.training:
            return in_batch, None
        self.step += 1
        if int(self.step) <= self.start_step:
            return in_batch, None
        slots = self.enqueue(embeddings, labels)
        return in_batch, self.memory_loss(embeddings, labels, slots)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``embeddings`` (B, D) float, ``labels`` (B,) int64 -> in-batch + weight * memory loss."""
        in_batch, mem = self.terms(embeddings, labels)
        return in_batch if mem is None else in_batch + self.weight * mem

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, size={self.size}, start_step={self.start_step}, "
                f"weight={self.weight}")
