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
import dataclasses
import math
import random
import time
from dataclasses import dataclass
import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError, parse_duration

log = logging.getLogger("deepmetric")

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
    #: seconds planned for the training images' first decoding into the memory cache (``data.cache``)
    fill_s: float = 0.0
    #: the CPU threads the measurement kept (``train.threads=0``; 0: not compared), and why where one
    threads: int = 0
    threads_note: Optional[str] = None

    def describe(self, budget: str) -> str:
        fill = f", {self.fill_s:.1f} s to decode the images into memory once" if self.fill_s else ""
        return (f"train.time_budget={budget} came to {self.max_steps:,} steps ({self.step_s * 1000:.0f} ms a step{fill}, "
                f"an evaluation every {self.eval_every:,} steps of {self.eval_s:.1f} s, the final test "
                f"{self.test_s:.1f} s); config.yaml records train.max_steps={self.max_steps}, which repeats the run")


def _steps_in(seconds: float, step_s: float, fill: Optional[Tuple[int, float, int]]) -> float:
    """Steps of ``step_s`` that fit ``seconds``, when the first use of each of ``fill = (items,
    seconds_each, per_step)`` not yet in memory also costs ``seconds_each`` (a step reads
    ``per_step`` images, each new until all ``items`` have been read once)."""
    if not fill or fill[0] <= 0 or fill[1] <= 0:
        return seconds / step_s
    items, each, per_step = fill
    steps = seconds / (step_s + each * per_step)
    if steps * per_step <= items:
        return steps
    return (seconds - each * items) / step_s


def plan_steps(budget_s: float, elapsed_s: float, step_s: float, eval_s: float, test_s: float,
               eval_every: int = 0, evaluations: int = EVALUATIONS, what: str = "",
               fill: Optional[Tuple[int, float, int]] = None) -> Plan:
    """The step count that fits ``budget_s`` seconds of training, after ``elapsed_s`` already spent
    on it, for steps of ``step_s`` seconds and periodic evaluations of ``eval_s`` (a run ends with
    one); ``test_s``, the test evaluation's time, is recorded, not counted. ``eval_every``: the
    recipe's (0: about ``evaluations`` of them, taking at most a quarter of the time). ``fill``:
    ``(images, seconds each, images per step)``, the training images not yet decoded into the
    memory cache (``data.cache``), each read from its file on first use and from memory after.

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
        steps = int(_steps_in(left, step_s + eval_s / eval_every, fill))
    else:
        n_eval = max(1, min(evaluations, int(left / max(eval_s, 1e-9) / 4)))  # evaluations take <= 1/4
        steps = int(_steps_in(left - n_eval * eval_s, step_s, fill))
        eval_every = max(1, math.ceil(steps / n_eval))
    steps = max(1, steps)
    fill_s = 0.0 if not fill else fill[1] * min(fill[0], steps * fill[2])
    return Plan(budget_s, steps, min(eval_every, steps), step_s, eval_s, test_s, elapsed_s, fill_s)


def budget_seconds(cfg) -> Optional[float]:
    value = cfg.train.time_budget
    return None if value is None else parse_duration(value)


def measure_budget(trainer: Any, started: Optional[float] = None, time_test: bool = True):
    """``(plan, untrained)`` for a trainer's ``train.time_budget``: its untrained evaluations timed
    (their metrics returned, to be recorded) and a few steps measured (:func:`measure_steps`), the run
    itself unchanged. ``started``: when the run began (its time counts against the budget);
    ``time_test``: also evaluate the test split (the untrained network's row; it is not counted)."""
    from ..core.distributed import broadcast_object

    cfg = trainer.cfg
    started = CLOCK() if started is None else started
    done, timed = {}, {}
    splits = ("val",) if trainer.val_evaluator is not None else ()
    for split in splits + (("test",) if time_test or not splits else ()):
        t0 = CLOCK()
        result = trainer.evaluate(split, record=False, notify=False)
        timed[split] = CLOCK() - t0
        if cfg.eval.untrained:
            done[split] = result.metrics
    cache = getattr(getattr(trainer, "parts", None), "cache", None)
    stats = None if cache is None else cache.stats("train")
    cold_s, warm_s, each_s = _time_steps(trainer, stats=stats)
    threads, threads_note = 0, None
    if cfg.train.threads == 0 and trainer.device.type == "cpu" and torch.get_num_threads() > 1:
        threads, one, threads_note = compare_threads(trainer, warm_s, stats)
        if one is not None:  # the steps of one thread (the images' decoding cost: the first timing's)
            cold_s, warm_s = one[0], one[1]
    fill = None
    if stats is not None and stats.misses and cache.fits("train"):  # new images decode once, then come from memory
        step_s, fill = warm_s, (cache.left_to_fill("train"), each_s, trainer.cfg.data.classes_per_batch
                                * trainer.cfg.data.samples_per_class)
    else:
        step_s = cold_s
    split = "val" if "val" in timed else "test"
    if timed[split] < 30.0 or cache is not None:  # the first evaluation pays for warming up (workers, kernels,
        # the cache): time it again
        t0 = CLOCK()
        trainer.evaluate(split, record=False, notify=False)
        timed[split] = min(timed[split], CLOCK() - t0)
    spent = CLOCK() - started - timed.get("test", 0.0)  # the test evaluations are not training
    if not cfg.eval.untrained and "val" in timed:  # that evaluation was for timing only
        spent -= timed["val"]
    plan = plan_steps(budget_seconds(cfg), spent, step_s, timed.get("val", timed.get("test")), timed.get("test", 0.0),
                      cfg.train.eval_every, what=str(cfg.train.time_budget), fill=fill)
    if threads:
        plan = dataclasses.replace(plan, threads=threads, threads_note=threads_note)
    return broadcast_object(plan), done  # every rank trains the steps rank 0 measured


def compare_threads(trainer: Any, step_s: float, stats: Any = None) -> Tuple[int, Optional[Tuple[float, float, float]],
                                                                             Optional[str]]:
    """``train.threads=0`` on the CPU: time the trainer's steps on one thread (:func:`_time_steps`)
    against ``step_s``, a step measured on torch's threads, and keep the faster count
    (``torch.set_num_threads``). Returns the count kept, and where it is one, that timing and a note
    saying why."""
    many = torch.get_num_threads()
    torch.set_num_threads(1)
    one = _time_steps(trainer, stats=stats)
    if one[1] < step_s:
        return 1, one, (f"train.threads=1: a step took {one[1] * 1000:.0f} ms on one thread against "
                        f"{step_s * 1000:.0f} ms on torch's {many} (its threads wait for one another where other "
                        f"work holds the cores or the operations are small), so the run computes on one")
    torch.set_num_threads(many)
    return many, None, None


def measure_steps(trainer: Any, steps: int = 8, warmup: int = 2) -> float:
    """Seconds a training step of ``trainer`` (a :class:`~deepmetric.engine.trainer.Trainer`) takes
    here: ``warmup + steps`` real steps on batches drawn the way training draws them, then every
    effect undone (weights, optimizer and loss state, memories, the hooks' state such as a moving
    average, the step counter and random generators), so the run that follows is the run
    ``train.max_steps`` would give."""
    return _time_steps(trainer, steps, warmup)[0]


def _time_steps(trainer: Any, steps: int = 8, warmup: int = 2, stats: Any = None) -> Tuple[float, float, float]:
    """``(step, step from memory, first read of an image)`` in seconds (see :func:`measure_steps`):
    the median step; with ``stats`` (the training images' :class:`~deepmetric.data.cache.CacheStats`),
    the median step less the time its images' first decoding took, and that time per image."""
    model_state = copy.deepcopy(trainer.model.state_dict())
    loss_state = copy.deepcopy(trainer.losses.state_dict())
    opt_state = {k: copy.deepcopy(o.state_dict()) for k, o in trainer.optimizers.items()}
    scaler_state = copy.deepcopy(trainer.scaler.state_dict())
    hooks = [(hook, hook.snapshot()) for hook in trainer.hooks]
    step = trainer.step
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    batches = trainer.calibration_batches()
    missed = (lambda: (stats.misses, stats.miss_s)) if stats is not None else (lambda: (0, 0.0))
    before = missed()
    try:
        times, warm = [], []
        for i in range(warmup + steps):
            t0 = CLOCK()
            read_s = missed()[1]
            images, labels, _ = next(batches)
            read_s = missed()[1] - read_s
            trainer.train_step(images, labels)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if i >= warmup:
                times.append(CLOCK() - t0)
                warm.append(times[-1] - read_s)
    finally:
        trainer.model.load_state_dict(model_state)
        trainer.losses.load_state_dict(loss_state)
        for k, o in trainer.optimizers.items():
            o.load_state_dict(opt_state[k])
        trainer.scaler.load_state_dict(scaler_state)
        for hook, snapshot in hooks:
            hook.restore(snapshot)
        trainer.step = step
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
    n, seconds = (after - was for after, was in zip(missed(), before))
    return float(np.median(times)), float(np.median(warm)), seconds / n if n else 0.0


def short_run_warmup(warmup: int, steps: int) -> int:
    """The warm-up a run of ``steps`` keeps: ``warmup``, or a tenth of the run when ``warmup`` is more
    than a fifth of it.

    >>> short_run_warmup(20, 500), short_run_warmup(20, 60)
    (20, 6)
    """
    return warmup if warmup <= steps // 5 else steps // 10


def fit_to_budget(trainer: Any, started: Optional[float] = None) -> Dict[str, Any]:
    """Set a trainer's ``train.max_steps`` and ``train.eval_every`` to what fits its
    ``train.time_budget`` (:func:`measure_budget`), its config to record them (and the budget as
    null) and its schedule to their length; returns the untrained evaluations made on the way."""
    from .schedule import LRSchedule

    plan, done = measure_budget(trainer, started)
    trainer.budget_plan = plan
    if plan.threads_note:
        trainer.notes.append(plan.threads_note)
        log.info("%s", trainer.notes[-1])
    trainer.notes.append(plan.describe(str(trainer.cfg.train.time_budget)))
    log.info("%s", trainer.notes[-1])
    update = {"train": trainer.cfg.train.model_copy(update={
        "max_steps": plan.max_steps, "eval_every": plan.eval_every, "time_budget": None,
        **({"threads": plan.threads} if plan.threads else {})})}
    warmup = trainer.cfg.scheduler.warmup_steps
    kept = short_run_warmup(warmup, plan.max_steps)
    if kept != warmup:
        update["scheduler"] = trainer.cfg.scheduler.model_copy(update={"warmup_steps": kept})
        trainer.notes.append(f"scheduler.warmup_steps={warmup} is more than a fifth of the {plan.max_steps} "
                             f"steps: {kept} instead")
    trainer.cfg = trainer.cfg.model_copy(update=update)
    trainer.schedule = LRSchedule(trainer.cfg.scheduler, [trainer.optimizers["main"]], plan.max_steps)
    return done
