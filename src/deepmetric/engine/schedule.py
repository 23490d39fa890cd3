"""Learning-rate schedule as a pure function of the step (plus plateau state), so it checkpoints as
a few numbers: linear warm-up, then constant, step, multistep, cosine, or reduce-on-plateau."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ..config import SchedulerConfig


class LRSchedule:
    """Sets every param group's lr to ``group['initial_lr'] * factor(step)``.

    ``plateau`` lowers the factor by ``gamma`` when the monitored metric (higher is better) has not
    improved by a relative ``threshold`` for ``patience`` evaluations, then waits ``cooldown``
    evaluations; the lr never goes below ``min_lr``.
    """

    def __init__(self, cfg: SchedulerConfig, optimizers: List[torch.optim.Optimizer], max_steps: int) -> None:
        self.cfg = cfg
        self.optimizers = optimizers
        self.max_steps = cfg.total_steps or max_steps
        for opt in optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.plateau_factor = 1.0
        self.best: Optional[float] = None
        self.bad_evals = 0
        self.cooldown_left = 0

    def factor(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            warm = c.warmup_factor + (1.0 - c.warmup_factor) * step / c.warmup_steps
        else:
            warm = 1.0
        if c.name == "step":
            f = c.gamma ** (step // c.step_size)
        elif c.name == "multistep":
            f = c.gamma ** sum(step >= m for m in c.milestones)
        elif c.name == "cosine":
            span = max(1, self.max_steps - c.warmup_steps)
            t = min(1.0, max(0.0, (step - c.warmup_steps) / span))
            f = 0.5 * (1.0 + math.cos(math.pi * t))
        elif c.name == "plateau":
            f = self.plateau_factor
        else:
            f = 1.0
        return warm * f

    def apply(self, step: int) -> float:
        """Set the lr for ``step`` (0-based, the step about to run); returns the first group's lr."""
        f = self.factor(step)
        for opt in self.optimizers:
            for g in opt.param_groups:
                lr = g["initial_lr"] * f
                if self.cfg.min_lr and self.cfg.name in ("cosine", "plateau"):
                    lr = max(lr, min(self.cfg.min_lr, g["initial_lr"]))
                g["lr"] = lr
        return self.optimizers[0].param_groups[0]["lr"]

    def observe(self, metric: float) -> None:
        """Feed an evaluation result (only ``plateau`` uses it)."""
        if self.cfg.name != "plateau" or metric is None or not math.isfinite(metric):
            return
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
        if self.best is None or metric > self.best * (1.0 + self.cfg.threshold):
            self.best, self.bad_evals = metric, 0
        elif self.cooldown_left == 0:
            self.bad_evals += 1
            if self.bad_evals > self.cfg.patience:
                self.plateau_factor *= self.cfg.gamma
                self.bad_evals = 0
                self.cooldown_left = self.cfg.cooldown

    def state_dict(self) -> Dict[str, Any]:
        return {"plateau_factor": self.plateau_factor, "best": self.best,
                "bad_evals": self.bad_evals, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.plateau_factor = state["plateau_factor"]
        self.best = state["best"]
        self.bad_evals = state["bad_evals"]
        self.cooldown_left = state["cooldown_left"]
