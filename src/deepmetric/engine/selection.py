"""Model selection: which evaluation of a run its ``best`` checkpoint holds.

A run with a validation split selects on it alone (the Metric Learning Reality Check protocol: the
test classes never choose a step). :class:`Selection` keeps the best validation value so far
(higher is better; the first of equal values is kept), its step and metrics, the number of
evaluations since it last improved (``train.early_stopping`` stops the run after that many) and the
selected weights, in memory on the CPU, so the final test reads no checkpoint back. After a resume
only ``checkpoints/best`` holds them: :meth:`Selection.load_into` reads it and checks its step.

A run chooses how it selects once (:func:`selection_for`): :class:`ByValidation`, or
:class:`LastStep` when there is no validation split (the last step is reported, not selected).
Each does a periodic evaluation its way and scores the test split at the end.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import ConfigError
from .checkpoint import CheckpointError, load_model_weights, read_checkpoint
from .interrupt import StopReason

log = logging.getLogger("deepmetric")


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


class ByValidation:
    """Select on the validation split: every periodic evaluation validates, the best ``eval.metric``
    so far is ``best`` (and drives the plateau schedule and early stopping); the test split is only
    logged there (``eval.test_during_training``), and scored once at the end on the selected weights."""

    validates = True

    def __init__(self, cfg: Any) -> None:
        self.metric, self.patience, self.log_test = cfg.eval.metric, cfg.train.early_stopping, cfg.eval.test_during_training
        self.record = Selection()

    def evaluate(self, trainer: Any, final: bool) -> Tuple[Dict[str, Any], bool]:
        """A periodic evaluation: ``(metrics for the checkpoint, whether it is the new best)``."""
        metrics = trainer.evaluate("val", notify=False).metrics
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)):
            raise ConfigError(f"eval.metric: '{self.metric}' was not computed on the validation split "
                              f"({trainer.summary_words('val')}); choose one of "
                              f"{', '.join(k for k, v in metrics.items() if isinstance(v, float))}")
        trainer.schedule.observe(value)
        improved = self.record.offer(trainer.step, value, metrics, trainer.evaluated)
        trainer.notify("on_evaluation", "val", metrics)  # with this selection
        final = final or trainer.callback_stop(sync=True)
        if self.record.exhausted(self.patience) and not final:
            trainer.stop(StopReason.EARLY_STOPPING)
            log.info("step %d: validation %s has not improved for %d evaluations (train.early_stopping); "
                     "stopping", trainer.step, self.metric, self.record.stale_evaluations)
        if self.log_test:
            trainer.last_result = trainer.evaluate("test")
        return metrics, improved

    def final_result(self, trainer: Any):
        """The test split scored once, on the selected weights."""
        if self.record.best_step is not None and self.record.best_step != trainer.step:
            self.record.load_into(trainer.evaluated, trainer.run_dir)
        return trainer.evaluate("test", neighbours=True, record=False)

    def summary(self) -> Dict[str, Any]:
        return {"selected_by": f"validation {self.metric}", "val": self.record.best_val}

    def state_dict(self) -> Dict[str, Any]:
        return self.record.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.record.load_state_dict(state)

    def reset(self) -> None:
        """Forget every evaluation so far: a continued run selects among its own evaluations."""
        self.record.reset()


class LastStep(ByValidation):
    """No validation split: the last step is reported, not selected. Each periodic evaluation scores
    the test split (logged); the last one is the reported one (with its neighbours)."""

    validates = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.final = None  # the last step's test evaluation, once made

    def evaluate(self, trainer: Any, final: bool) -> Tuple[Dict[str, Any], bool]:
        result = trainer.evaluate("test", neighbours=final)
        trainer.last_result = result
        stopped_here = not final and trainer.callback_stop(sync=True)
        self.record.best_step = trainer.step
        if final:  # the reported evaluation of a run without validation
            self.final = result
        return result.metrics, final or stopped_here  # then "best" is this step

    def final_result(self, trainer: Any):
        if self.final is not None:
            trainer.notify("on_evaluation", "test", self.final.metrics)
            return self.final
        # stopped by a callback, or resumed at max_steps: the last step again, with its neighbours
        return trainer.evaluate("test", neighbours=True, record=False)

    def summary(self) -> Dict[str, Any]:
        return {"selected_by": None, "val": None}


def selection_for(cfg: Any, validates: bool):
    """The strategy a run selects by, chosen once: :class:`ByValidation` with a validation split,
    else :class:`LastStep`."""
    return ByValidation(cfg) if validates else LastStep(cfg)
