"""Model selection: which evaluation of a run its ``best`` checkpoint holds.

A run with a validation split selects on it alone (the Metric Learning Reality Check protocol: the
test classes never choose a step). :class:`Selection` keeps the best validation value so far
(higher is better; the first of equal values is kept), its step and metrics, the number of
evaluations since it last improved (``train.early_stopping`` stops the run after that many) and the
selected weights, in memory on the CPU, so the final test reads no checkpoint back. After a resume
only ``checkpoints/best`` holds them: :meth:`Selection.load_into` reads it and checks its step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .checkpoint import CheckpointError, load_model_weights, read_checkpoint


@dataclass
class Selection:
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    best_val: Dict[str, Any] = field(default_factory=dict)  # the validation metrics at best_step
    stale_evaluations: int = 0  # evaluations since the last improvement
    weights: Optional[Dict[str, torch.Tensor]] = None  # best_step's model weights (None after a resume)

    def offer(self, step: int, value: float, metrics: Dict[str, Any], model: torch.nn.Module) -> bool:
        """One validation evaluation; whether it is the new best (its weights are then kept)."""
        improved = self.best_value is None or value > self.best_value
        if improved:
            self.best_value, self.best_step, self.best_val = value, step, metrics
            self.stale_evaluations = 0
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.stale_evaluations += 1
        return improved

    def exhausted(self, patience: int) -> bool:
        """``patience`` evaluations in a row without improvement (0: never)."""
        return bool(patience) and self.stale_evaluations >= patience

    def reset(self) -> None:
        """Forget every evaluation so far: a continued run selects among its own evaluations."""
        self.__init__()

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint's ``state.json`` records (the weights are the ``best`` checkpoint)."""
        return {"best_value": self.best_value, "best_step": self.best_step, "best_val": self.best_val,
                "stale_evaluations": self.stale_evaluations}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        self.best_val = state.get("best_val") or {}
        self.stale_evaluations = state.get("stale_evaluations", 0)
        self.weights = None

    def load_into(self, model: torch.nn.Module, run_dir: Path) -> None:
        """The selected weights into ``model``: from memory, or after a resume from ``run_dir``'s
        ``checkpoints/best``, refused when that holds another step (the folder was changed by hand)."""
        if self.weights is not None:
            model.load_state_dict(self.weights)
            return
        ckpt, state = read_checkpoint(run_dir, prefer="best")
        if state.get("step") != self.best_step:
            raise CheckpointError(f"{ckpt}: holds step {state.get('step')}, but the run selected step "
                                  f"{self.best_step}; the run directory was changed by hand")
        load_model_weights(model, ckpt)
