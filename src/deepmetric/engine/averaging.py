"""An exponential moving average of the model's weights (``train.ema``): Polyak averaging.

Training steps the live weights; after each step every floating-point tensor of the average (weights
and BatchNorm statistics) moves towards them, ``avg = d * avg + (1 - d) * live``, and integer
buffers (BatchNorm's batch count) are copied. The decay warms up as TensorFlow's
``ExponentialMovingAverage`` with ``num_updates`` (and timm's ``ModelEma``) do:
``d_k = min(ema, (1 + k) / (10 + k))`` at the k-th update, so the random initialisation is forgotten
within a few dozen steps (its share after 50 updates: 2e-9) instead of weighing ``ema ** k``.

The average never feeds back into training: evaluation, selection, the checkpoints' ``model.safetensors``
and therefore ``deepmetric eval``, export and search use it, while the live weights (in
``train_state.safetensors`` as ``live.*``) are what a resumed run continues to train.
"""
from __future__ import annotations

import copy
import torch


class WeightAverage:
    """The average of ``model``'s weights with decay ``decay`` in [0, 1), held in its own copy of the
    model (``self.model``, in eval mode, NCHW memory order, without gradients)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def rate(self, k: int) -> float:
        """The decay of the k-th update (k >= 1)."""
        return min(self.decay, (1.0 + k) / (10.0 + k))

    @torch.no_grad()
    def update(self, live: torch.nn.Module) -> None:
        """One update from ``live`` (the same architecture)."""
        self.updates += 1
        d = self.rate(self.updates)
        for avg, new in zip(self.model.state_dict().values(), live.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(new.detach(), alpha=1.0 - d)
            else:
                avg.copy_(new)
