"""Callbacks: code of your own that the :class:`~deepmetric.engine.trainer.Trainer` calls as a run goes.

Subclass :class:`Callback`, override the methods you need and pass instances as
``Trainer(cfg, run_dir, callbacks=[...])``. They run on the main rank only (rank 0 under ``torchrun``),
in the order given, in this order within a run::

    on_fit_start(trainer)                             # the run directory holds config.yaml and splits.json
    on_evaluation(trainer, "val" / "test", metrics)   # step 0: the untrained network (eval.untrained)
    on_step_end(trainer, record)                      # after every optimizer step
    on_evaluation(trainer, split, metrics)            # every train.eval_every steps and at the last
    on_checkpoint(trainer, "last" / "best", path)     # after each checkpoint is written
    on_evaluation(trainer, "test", metrics)           # the selected checkpoint, tested once
    on_fit_end(trainer, summary)                      # what fit() returns
    on_fit_error(trainer, exc)                        # instead, when fit() raises (Ctrl-C included)

A callback may set ``trainer.should_stop = True``: the run ends after the current step as if
``train.max_steps`` were that step (its evaluation, ``last`` and ``best``, the final test of the
selected checkpoint). ``trainer.final_test`` is true during the last ``on_evaluation``.

:class:`ProgressLog` is the one the trainer adds itself when progress is on and stderr is no terminal;
:class:`WriteReport` writes the run's ``report.html`` (``deepmetric train`` adds it), before the
trackers that run after it (:mod:`.tracking`) log the run's files.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

log = logging.getLogger("deepmetric")


class Callback:
    """Hooks into a training run; every method does nothing unless overridden (see the module doc)."""

    def on_fit_start(self, trainer: Any) -> None:
        """When ``fit()`` starts training (a resumed run: at its checkpoint's ``trainer.step``), after
        ``config.yaml`` and ``splits.json`` are written."""

    def on_step_end(self, trainer: Any, record: Dict[str, Any]) -> None:
        """After every optimizer step. ``record`` has ``step`` and ``epoch``; on logging steps
        (every ``train.log_every`` and the last) it is the ``metrics.jsonl`` row, with ``loss`` (the
        mean since the previous row), ``lr`` and ``images_per_s`` too."""

    def on_evaluation(self, trainer: Any, split: str, metrics: Dict[str, Any]) -> None:
        """After an evaluation of ``split`` (``"val"`` or ``"test"``) at ``trainer.step``; ``metrics``
        maps names such as ``recall@1`` to values. During a periodic validation ``trainer.best_value``
        and ``trainer.best_step`` already count this one."""

    def on_checkpoint(self, trainer: Any, name: str, path: Path) -> None:
        """After checkpoint ``name`` (``"last"`` or ``"best"``) was written to the folder ``path``."""

    def on_fit_end(self, trainer: Any, summary: Dict[str, Any]) -> None:
        """At the end of ``fit()``, with the summary it returns (``metrics.json`` is written)."""

    def on_fit_error(self, trainer: Any, exc: BaseException) -> None:
        """When ``fit()`` raises ``exc``, just before it is re-raised: an error, or ``KeyboardInterrupt``
        (Ctrl-C or SIGTERM, after ``last`` was saved). An error of this hook is logged, never raised
        in place of ``exc``."""


class LogRecords(Callback):
    """``Trainer(on_log=fn)``: ``fn(row)`` for every row written to ``metrics.jsonl`` (training rows
    and ``{"step", "split", "eval"}`` evaluation rows); the final test of the selected checkpoint is
    not such a row (it is in ``metrics.json``)."""

    def __init__(self, fn: Callable[[Dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_step_end(self, trainer: Any, record: Dict[str, Any]) -> None:
        if "loss" in record:
            self.fn(record)

    def on_evaluation(self, trainer: Any, split: str, metrics: Dict[str, Any]) -> None:
        if not trainer.final_test:
            self.fn({"step": trainer.step, "split": split, "eval": metrics})


class WriteReport(Callback):
    """The run's report, written at the end of ``fit()`` by ``write(trainer, summary) -> path``
    (``deepmetric train`` passes :func:`deepmetric.viz.report.write_run_report`: the engine does not
    draw). Put it before a tracker so that the tracker logs the report: the recipe's
    ``tracking.mlflow`` runs after every callback given. ``path``: the report, once written."""

    def __init__(self, write: Callable[[Any, Dict[str, Any]], Path]) -> None:
        self.write = write
        self.path: Optional[Path] = None

    def on_fit_end(self, trainer: Any, summary: Dict[str, Any]) -> None:
        self.path = Path(self.write(trainer, summary))


def format_duration(seconds: float) -> str:
    """``130`` -> ``'2m10s'``; ``3725`` -> ``'1h02m'``; ``9`` -> ``'9s'``.

    >>> format_duration(130), format_duration(3725), format_duration(9.4)
    ('2m10s', '1h02m', '9s')
    """
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressLog(Callback):
    """Progress as log lines, for runs whose stderr is no terminal (a file, a job scheduler's log),
    where the tqdm bar is off: every ``train.log_every`` steps
    ``step 150/800  loss 0.1234  lr 1.00e-03  812 img/s  ETA 2m10s`` (the ETA from the wall time per
    step so far in this process, evaluations included), and one line per evaluation."""

    def __init__(self, max_steps: int, start_step: int = 0) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer: Any, record: Dict[str, Any]) -> None:
        if "loss" not in record:
            return
        step = record["step"]
        per_step = (time.perf_counter() - self.t0) / max(step - self.start_step, 1)
        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f img/s  ETA %s", step, self.max_steps, record["loss"],
                 record["lr"], record["images_per_s"], format_duration(per_step * (self.max_steps - step)))

    def on_evaluation(self, trainer: Any, split: str, metrics: Dict[str, Any]) -> None:
        if trainer.final_test:
            return
        metric = trainer.cfg.eval.metric
        value = metrics.get(metric)
        words = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else describe(metrics)
        name = {"val": "validation", "test": "test"}.get(split, split)
        best = ""
        if split == "val" and trainer.best_step is not None and trainer.step > 0:
            best = f" (best {trainer.best_value:.4f} at step {trainer.best_step})"
        when = f"step {trainer.step}" + (" (untrained)" if trainer.step == 0 else "")
        log.info("%s: %s %s%s", when, name, words, best)


def describe(metrics: Dict[str, Any], limit: int = 4) -> str:
    """The first ``limit`` numeric metrics as ``name value`` pairs."""
    pairs = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)][:limit]
    return ", ".join(pairs) or "no metrics"


def run_callbacks(callbacks, event: str, *args: Any) -> None:
    """Call ``event`` on every callback, in order."""
    for cb in callbacks:
        getattr(cb, event)(*args)


def report_fit_error(callbacks, trainer: Any, exc: BaseException) -> None:
    """``on_fit_error(trainer, exc)`` on every callback; one that fails is logged, so that ``exc``
    (which the caller re-raises) stays the error the user sees."""
    for cb in callbacks:
        try:
            cb.on_fit_error(trainer, exc)
        except Exception as e:  # noqa: BLE001 - whatever a user's hook raises
            log.warning("%s.on_fit_error failed (%s: %s) while the run stopped on %s",
                        type(cb).__name__, type(e).__name__, e, type(exc).__name__)

