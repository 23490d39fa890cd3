"""Hooks: parts of a run's behaviour that own one concern each, on every rank.

Callbacks (:mod:`.callbacks`) are the user's hooks, called on the main rank only, where the run's
files are written. A :class:`TrainingHook` is a part of the training itself, so it runs on every
rank under ``torchrun``; it may replace the model that is evaluated and saved, and keep tensors of
its own in the checkpoints (:meth:`TrainingHook.extra_state`, restored by
:meth:`TrainingHook.load_extra_state` when a run resumes). Adding such a behaviour is one hook in
one file; the trainer does not change.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch

from .averaging import WeightAverage
from .checkpoint import CheckpointError, load_into


class TrainingHook:
    """Does nothing unless overridden. ``trainer`` is the :class:`~deepmetric.engine.trainer.Trainer`."""

    def after_step(self, trainer: Any) -> None:
        """After each optimizer step (``trainer.step`` already counts it), before the callbacks."""

    def evaluated(self) -> Optional[torch.nn.Module]:
        """The module a run evaluates, selects and saves as ``model.safetensors`` instead of the live
        model, or None."""
        return None

    def extra_state(self, trainer: Any) -> Dict[str, torch.Tensor]:
        """Tensors to keep in the checkpoints' ``train_state.safetensors`` (keys with a prefix of the
        hook's own, e.g. ``live.``)."""
        return {}

    def load_extra_state(self, trainer: Any, tensors: Dict[str, torch.Tensor], source: str) -> None:
        """Restore what :meth:`extra_state` saved, from a checkpoint's train state (``source`` names it)."""

    def snapshot(self) -> Any:
        """What :meth:`restore` needs to undo the steps that follow (``train.time_budget`` measures
        steps, then undoes them)."""
        return None

    def restore(self, snapshot: Any) -> None:
        """Back to :meth:`snapshot`'s state."""


class MovingAverage(TrainingHook):
    """``train.ema``: an exponential moving average of the weights (:class:`~.averaging.WeightAverage`)
    is what the run evaluates, selects and saves; the live weights train, and are kept as ``live.*``
    so that a resumed run continues both."""

    PREFIX = "live."

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.average = WeightAverage(model, decay)

    def after_step(self, trainer: Any) -> None:
        self.average.update(trainer.model)

    def evaluated(self) -> torch.nn.Module:
        return self.average.model

    def extra_state(self, trainer: Any) -> Dict[str, torch.Tensor]:
        return {f"{self.PREFIX}{k}": v for k, v in trainer.model.state_dict().items()}

    def load_extra_state(self, trainer: Any, tensors: Dict[str, torch.Tensor], source: str) -> None:
        if not any(k.startswith(self.PREFIX) for k in tensors):
            raise CheckpointError(f"{source}: holds no live weights (live.* of the train state): it was saved "
                                  f"without train.ema, so train.ema cannot resume it; resume with train.ema=0")
        load_into(trainer.model, tensors, source, prefix=self.PREFIX, mismatch=lambda first, count: (
            f"{source}: the live weights are of another architecture than the model ({first}); resume with the "
            f"model of its checkpoint's config.yaml"))
        self.average.updates = trainer.step  # one update per step

    def snapshot(self) -> Any:
        return copy.deepcopy(self.average.model.state_dict()), self.average.updates

    def restore(self, snapshot: Any) -> None:
        state, self.average.updates = snapshot
        self.average.model.load_state_dict(state)
