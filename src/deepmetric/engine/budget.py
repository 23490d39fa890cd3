"""``train.time_budget``: a run that fits a wall-clock budget, and repeats exactly as a step count.

Before the first step the trainer measures what a run is made of (:func:`measure_steps`: a few
training steps on this machine, on the real batches, whose every effect is then undone) beside the
untrained evaluations it does anyway, and :func:`plan_steps` turns the budget left into
``train.max_steps`` (and ``train.eval_every``, about :data:`EVALUATIONS` evaluations when the recipe
sets none). The run then trains that many steps like any other, and its ``config.yaml`` records them,
so ``deepmetric train RUN/config.yaml`` (or ``train.max_steps=N``) repeats it bit for bit on any
machine. The budget covers training: the untrained validation, the steps and every periodic
evaluation (the validations that select; without a validation split, the test evaluations that are
then the run's record). The test split's two reported evaluations, the untrained network's and the
selected checkpoint's, come on top: they take what the test set's size asks, whatever the budget.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..config import ConfigError, parse_duration

#: the clock steps and evaluations are timed by (a benchmark that calibrates budgets on a busy machine
#: may set ``time.process_time``: a one-thread process's CPU time is its wall time on an idle machine)
CLOCK = time.perf_counter
#: evaluations a budgeted run makes when the recipe sets no ``train.eval_every``
EVALUATIONS = 10
#: part of the budget kept back for what is not measured (checkpoint writes, logging, jitter)
SAFETY = 0.05


@dataclass(frozen=True)
class Plan:
    """What a budget came to: ``max_steps`` and ``eval_every``, and the measurements behind them."""

    budget_s: float
    max_steps: int
    eval_every: int
    step_s: float
    eval_s: float
    test_s: float
    elapsed_s: float

    def describe(self, budget: str) -> str:
        return (f"train.time_budget={budget} came to {self.max_steps:,} steps ({self.step_s * 1000:.0f} ms a step, "
                f"an evaluation every {self.eval_every:,} steps of {self.eval_s:.1f} s, the final test "
                f"{self.test_s:.1f} s); config.yaml records train.max_steps={self.max_steps}, which repeats the run")


def plan_steps(budget_s: float, elapsed_s: float, step_s: float, eval_s: float, test_s: float,
               eval_every: int = 0, evaluations: int = EVALUATIONS, what: str = "") -> Plan:
    """The step count that fits ``budget_s`` seconds of training, after ``elapsed_s`` already spent
    on it, for steps of ``step_s`` seconds and periodic evaluations of ``eval_s`` (a run ends with
    one); ``test_s``, the test evaluation's time, is recorded, not counted. ``eval_every``: the
    recipe's (0: about ``evaluations`` of them, taking at most a quarter of the time).

    >>> p = plan_steps(100.0, 10.0, 0.1, 2.0, 3.0)
    >>> p.max_steps, p.eval_every
    (650, 65)

    Raises:
        ConfigError: the budget does not cover ten steps and one evaluation after what was spent,
            naming ``train.time_budget`` and the smallest budget that would (``what``: the budget as
            given, for the message).
    """
    left = budget_s * (1.0 - SAFETY) - elapsed_s
    need = elapsed_s + eval_s + 10 * step_s
    if left - eval_s < 10 * step_s:
        raise ConfigError(
            f"train.time_budget={what or budget_s}: too short for one evaluation: the untrained evaluation took "
            f"{elapsed_s:.1f} s, an evaluation takes {eval_s:.1f} s and a step {step_s * 1000:.0f} ms; give at "
            f"least {math.ceil(need / (1.0 - SAFETY))}s, or train.max_steps")
    if eval_every:
        steps = int(left / (step_s + eval_s / eval_every))
    else:
        n_eval = max(1, min(evaluations, int(left / max(eval_s, 1e-9) / 4)))  # evaluations take <= 1/4
        steps = int((left - n_eval * eval_s) / step_s)
        eval_every = max(1, math.ceil(steps / n_eval))
    steps = max(1, steps)
    return Plan(budget_s, steps, min(eval_every, steps), step_s, eval_s, test_s, elapsed_s)


def budget_seconds(cfg) -> Optional[float]:
    value = cfg.train.time_budget
    return None if value is None else parse_duration(value)


def measure_steps(trainer: Any, steps: int = 8, warmup: int = 2) -> float:
    """Seconds a training step of ``trainer`` (a :class:`~deepmetric.engine.trainer.Trainer`) takes here: ``warmup + steps`` real steps on batches
    drawn the way training draws them, then every effect undone (weights, optimizer and loss state,
    memories, moving average, step counter and random generators), so the run that follows is the run
    ``train.max_steps`` would give."""
    model_state = copy.deepcopy(trainer.model.state_dict())
    loss_state = copy.deepcopy(trainer.losses.state_dict())
    opt_state = {k: copy.deepcopy(o.state_dict()) for k, o in trainer.optimizers.items()}
    scaler_state = copy.deepcopy(trainer.scaler.state_dict())
    ema_state = None if trainer.ema is None else copy.deepcopy(trainer.ema.model.state_dict())
    step = trainer.step
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    batches = trainer.calibration_batches()
    try:
        times = []
        for i in range(warmup + steps):
            t0 = CLOCK()
            images, labels, _ = next(batches)
            trainer.train_step(images, labels)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if i >= warmup:
                times.append(CLOCK() - t0)
    finally:
        trainer.model.load_state_dict(model_state)
        trainer.losses.load_state_dict(loss_state)
        for k, o in trainer.optimizers.items():
            o.load_state_dict(opt_state[k])
        trainer.scaler.load_state_dict(scaler_state)
        if ema_state is not None:
            trainer.ema.model.load_state_dict(ema_state)
            trainer.ema.updates = step
        trainer.step = step
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
    return float(np.median(times))
