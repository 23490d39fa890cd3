"""``deepmetric tune DATA_OR_RECIPE --time 30m``: a hyperparameter search with Optuna, on validation MAP@R.

**The base.** Your images (the automatic recipe, :func:`~deepmetric.engine.auto.auto_config`) or a
recipe, with ``key=value`` overrides. Trial 0 is the base itself, the default; the trials after it
are drawn by Optuna's TPE sampler (seeded with the recipe's ``seed``) from
:data:`~deepmetric.engine.tune_space.SPACE`: the loss family (multi-similarity, triplet, circle,
contrastive, supervised contrastive) and its parameters, a cross-batch memory (off, or its size), the
learning rate (log scale, 0.1x to 10x the base's), the augmentation (``tensor`` or ``tensor_augment``;
``xbm`` or ``imagenet`` crops for a pretrained backbone), the embedding size and the small CNN's
width. ``deepmetric tune --space`` prints the table.

**Validation classes only.** Trials are scored on the validation classes (``data.val_classes``, carved
from the training classes) and selected there; a trial's run never sees the test classes: its
evaluation split is the validation split too (:func:`validation_as_test`). A recipe without a
validation split (the automatic recipe has none below 30 training classes) is given
:data:`VAL_SHARE` of its training classes: a validation split of a handful of classes is noisy, but
a search cannot select on none, and the test classes stay unseen. ``eval.metric`` is ``map@r``.

**Length.** Each trial trains for ``train.time_budget`` (``--trial-budget``; with ``--trials N``, the
``--time`` divided among them; else a tenth of ``--time``), or for the recipe's ``train.max_steps``
when you set that override. No trial starts when the time left is less than a trial. ``--trials N``
stops the study at N finished (complete or pruned) trials.

**Pruning.** A callback reports each validation (the running best MAP@R, at step = the evaluation's
number, so runs of different speeds compare at the same share of their budget) to Optuna; when the
pruner (median, or ASHA: successive halving) says so, the run stops cleanly after that evaluation
(``trainer.should_stop``) and the trial is marked pruned. The default is never pruned.

**Resume.** The study is ``RUN/study.db`` (SQLite; ``load_if_exists``) and trial ``N`` runs in
``RUN/trials/NNNN``; the same command again continues the search. A trial interrupted mid-run (Ctrl-C,
SIGTERM, a kill) is marked failed, never complete, and its parameters run again as a new trial.

**The end.** The best complete trial's recipe is ``RUN/best.yaml`` (its ``config.yaml``: the step
count its budget came to; ``deepmetric train RUN/best.yaml`` repeats it); its checkpoint, and the
default's, are scored once on the test classes (``RUN/test/NNNN/metrics.json``, kept, never scored
again); ``RUN/report.html`` (:mod:`deepmetric.viz.tune_report`) shows Optuna's plots beside the table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import Config, ConfigError, load_config, parse_duration, resolve_recipe, save_config, validate
from ..core.errors import UserError
from ..data.base import DataSplits
from .auto import auto_config, is_data_path
from .build import build_data
from .callbacks import Callback, format_duration
from .tune_space import SPACE, Dimension, base_choices, get_key, set_key, space_for, trial_recipe

log = logging.getLogger("deepmetric")

#: the metric the search maximises, on the validation classes
METRIC = "map@r"
#: the share of the training classes that validates when the recipe has no validation split
VAL_SHARE = 0.3
#: with ``--time`` alone, each trial gets this fraction of it
TRIALS_IN_TIME = 10
#: part of ``--time`` kept for the end: the test of the best and the default, the report
RESERVE = 0.05
#: trials TPE draws at random before it models the results
STARTUP_TRIALS = 5
#: median pruning: trials finished before any is pruned, and evaluations a trial makes first
PRUNE_AFTER, PRUNE_WARMUP = 3, 2
#: the pruners ``--pruner`` names
PRUNERS = {
    "median": lambda optuna: optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER, n_warmup_steps=PRUNE_WARMUP),
    "asha": lambda optuna: optuna.pruners.SuccessiveHalvingPruner(min_resource="auto", reduction_factor=3),
}
#: failures in a row after which the search stops (a recipe every trial fails on)
MAX_FAILURES = 3
#: what a trial's run sets beside its choices (validation only, no bar); best.yaml gets the base's back
TRIAL_SETTINGS = {"eval.untrained": False, "eval.test_during_training": False, "train.progress": False}


def _optuna():
    import optuna  # the `tune` extra; the CLI names it when missing

    return optuna


# -- the base recipe -----------------------------------------------------------------------------------

@dataclass
class Base:
    """The recipe a search starts from (trial 0), and what was said about it."""

    config: Config
    lines: List[str] = field(default_factory=list)
    steps_given: bool = False


def _given(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def tune_base(target: str, overrides: Sequence[str] = ()) -> Base:
    """The base recipe of ``deepmetric tune TARGET``: the automatic recipe of an image folder or list,
    or a recipe; with a validation split (:data:`VAL_SHARE` where it has none) and ``eval.metric``
    ``map@r``.

    Raises:
        ConfigError: not the retrieval protocol; ``data.val_classes=null`` given; a bad override.
    """
    overrides = list(overrides)
    lines: List[str] = []
    if is_data_path(target):
        auto = auto_config(target, overrides)
        lines.append(f"{target}: a recipe from the data (key=value overrides any choice):\n{auto.describe()}")
        cfg = auto.config

        def with_validation(share: float) -> Config:  # the recipe chooses its batch knowing the split
            return auto_config(target, [*overrides, f"data.val_classes={share}"]).config
    else:
        cfg = load_config(resolve_recipe(target), overrides)

        def with_validation(share: float) -> Config:
            return cfg.with_overrides([f"data.val_classes={share}"])
    if cfg.eval.protocol != "retrieval":
        raise ConfigError(f"eval.protocol: tune scores validation MAP@R of the retrieval protocol; {target} uses "
                          f"'{cfg.eval.protocol}' (set eval.protocol=retrieval, or tune another recipe)")
    if cfg.data.val_classes is None:
        if _given(overrides, "data.val_classes"):
            raise ConfigError("data.val_classes=null: tune selects on validation classes and never on the test "
                              "classes; give a share (e.g. data.val_classes=0.3) or leave it unset")
        splits = build_data(cfg)
        if splits.val is None:
            cfg = with_validation(VAL_SHARE)
            val = build_data(cfg).val
            n_val = len(set(val.query.labels.tolist()))
            n_train = len(set(splits.train_class_ids.tolist())) if splits.train_class_ids is not None else splits.num_classes
            lines.append(f"validation: the recipe has none ({n_train} training classes); tune validates on "
                         f"{n_val} of them ({VAL_SHARE:.0%}, data.val_classes={VAL_SHARE}), never on the test classes")
    cfg = cfg.with_overrides([f"eval.metric={METRIC}"])
    steps = _given(overrides, "train.max_steps") and not _given(overrides, "train.time_budget")
    return Base(cfg, lines, steps)


def validation_as_test(splits: DataSplits) -> DataSplits:
    """The splits a trial trains on: the training classes, with the validation classes both as the
    validation split and as the split the run tests (so the test classes never reach a trial)."""
    val = splits.val
    return dataclasses.replace(splits, query=val.query, gallery=val.gallery, pairs=val.pairs)


def option_seconds(flag: str, value: Optional[str]) -> Optional[float]:
    """``--time 30m`` in seconds (None when not given); a bad duration is one line naming the flag."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise UserError(f"{flag} {value}: {e}") from None


# -- pruning -------------------------------------------------------------------------------------------

class ReportToOptuna(Callback):
    """Reports each validation evaluation to an Optuna trial: the run's best validation MAP@R so far,
    at step = the evaluation's number; stops the run (``trainer.should_stop``) when the trial's pruner
    says so and ``prune`` allows it. ``pruned_at``: the step it stopped at (None: not pruned)."""

    def __init__(self, trial: Any, prune: bool = True) -> None:
        self.trial = trial
        self.prune = prune
        self.pruned_at: Optional[int] = None

    def on_evaluation(self, trainer: Any, split: str, metrics: Dict[str, Any]) -> None:
        if split != "val" or trainer.final_test or trainer.step == 0 or trainer.best_value is None:
            return
        self.trial.report(float(trainer.best_value), trainer.evaluations)
        if self.prune and self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = trainer.step
            trainer.should_stop = True


class StopAtDeadline(Callback):
    """Stops a run (``trainer.should_stop``) after the first step that ends past ``deadline`` (a
    ``time.perf_counter()`` value): the end of ``--time``, which a trial's own budget, measured when it
    started, overruns when the machine slows down under it. ``stopped_at``: that step (None: not)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.stopped_at: Optional[int] = None

    def on_step_end(self, trainer: Any, record: Dict[str, Any]) -> None:
        if self.stopped_at is None and time.perf_counter() > self.deadline:
            self.stopped_at = trainer.step
            trainer.should_stop = True


# -- the search ----------------------------------------------------------------------------------------

@dataclass
class TuneResult:
    """A finished search: the study, the default (trial 0) and best trials, their test metrics."""

    run_dir: Path
    study: Any
    default: Any
    best: Any
    test: Dict[int, Dict[str, Any]]
    best_yaml: Path
    counts: Dict[str, int]
    seconds: float


class Search:
    """One ``deepmetric tune``: :meth:`run` the study in ``run_dir`` (see the module docstring).

    ``time`` (seconds) bounds the search; ``trial_budget`` (``"2m"``) is each trial's
    ``train.time_budget`` (see :meth:`trial_length` for the defaults); ``trials`` stops at that many
    finished trials; ``pruner``: a name of :data:`PRUNERS` or an Optuna pruner; ``space``: the
    table searched; ``callbacks`` join every trial's Trainer.
    """

    def __init__(self, base: Base, run_dir: str | Path, *, time: Optional[float] = None,
                 trial_budget: Optional[str] = None, trials: Optional[int] = None, pruner: Any = "median",
                 space: Sequence[Dimension] = SPACE, callbacks: Sequence[Callback] = ()) -> None:
        if time is None and trials is None:
            raise UserError("tune: give --time (e.g. --time 30m) or --trials N")
        if trials is not None and trials < 1:
            raise UserError(f"--trials {trials}: give at least 1")
        if isinstance(pruner, str) and pruner not in PRUNERS:
            raise UserError(f"--pruner {pruner}: choose one of {', '.join(PRUNERS)}")
        self.base = base.config
        self.base_raw = self.base.to_dict()
        self.run_dir = Path(run_dir)
        self.time, self.trials, self.pruner = time, trials, pruner
        self.space = space_for(self.base_raw, space)
        self.callbacks = list(callbacks)
        self.trial_budget = self.trial_length(base, time, trial_budget, trials)
        self.trial_s = None if self.trial_budget is None else parse_duration(self.trial_budget)
        if time is not None and self.trial_s is not None and self.trial_s > time * (1 - RESERVE):
            raise UserError(f"--time {format_duration(time)}: shorter than one trial of {self.trial_budget} "
                            f"(--trial-budget); give more time or a shorter --trial-budget")

    @staticmethod
    def trial_length(base: Base, time: Optional[float], trial_budget: Optional[str],
                     trials: Optional[int]) -> Optional[str]:
        """Each trial's ``train.time_budget`` (None: the recipe's ``train.max_steps``): ``trial_budget``;
        else the step count you gave (``train.max_steps=N``); else ``--time`` shared among ``trials``
        (a tenth of it without); else the recipe's own length."""
        if trial_budget is not None:
            option_seconds("--trial-budget", trial_budget)
            return trial_budget
        if base.steps_given:
            return None
        if time is not None:
            return f"{max(1, math.floor(time * (1 - RESERVE) / (trials or TRIALS_IN_TIME)))}s"
        value = base.config.train.time_budget
        return None if value is None else str(value)

    # -- the study ---------------------------------------------------------------------------------
    def _open(self):
        optuna = _optuna()
        db = self.run_dir / "study.db"
        recorded = self.run_dir / "base.yaml"
        if not db.exists() and (self.run_dir / "trials").exists():
            raise UserError(f"{self.run_dir}: holds trials/ but no study.db; choose another --run-dir")
        if recorded.is_file():
            if load_config(recorded).to_dict() != self.base_raw:
                raise UserError(f"{self.run_dir}: its search started from another recipe ({recorded}); run the same "
                                f"command to resume it, or choose another --run-dir")
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.base, recorded)
        pruner = PRUNERS[self.pruner](optuna) if isinstance(self.pruner, str) else self.pruner
        study = optuna.create_study(study_name="tune", storage=f"sqlite:///{db}", direction="maximize",
                                    pruner=pruner, load_if_exists=True)
        # seeded, and seeded apart per session: a resumed search does not draw its first trials again
        study.sampler = optuna.samplers.TPESampler(seed=self.base.seed + len(study.trials),
                                                   n_startup_trials=STARTUP_TRIALS)
        running = optuna.trial.TrialState.RUNNING
        for t in study.trials:
            if t.state == running:  # a session killed mid-trial: failed, and run again
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                self._rerun(study, t)
                log.info("trial %d was interrupted: marked failed, to run again", t.number)
        if not study.trials:
            study.enqueue_trial(base_choices(self.space, self.base_raw), user_attrs={"default": True})
        return study

    @staticmethod
    def _rerun(study: Any, trial: Any) -> None:
        attrs = {"rerun_of": trial.number, **({"default": True} if trial.user_attrs.get("default") else {})}
        study.enqueue_trial(trial.params, user_attrs=attrs)

    def _finished(self, study: Any) -> List[Any]:
        states = _optuna().trial.TrialState
        return [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]

    def _another(self, study: Any, spent: float) -> bool:
        finished = self._finished(study)
        if self.trials is not None and len(finished) >= self.trials:
            return False
        if self.time is None:
            return True
        left = self.time * (1 - RESERVE) - spent
        done = [t.user_attrs.get("seconds", 0.0) for t in finished]
        need = self.trial_s if self.trial_s is not None else (sum(done) / len(done) if done else 0.0)
        if left < need:
            log.info("tune: %s: no more trials", f"--time {format_duration(self.time)} is spent" if left <= 0 else
                     f"{format_duration(left)} left of --time {format_duration(self.time)}, less than a trial "
                     f"({format_duration(need)})")
            return False
        return True

    def run(self) -> TuneResult:
        """Run trials until ``trials`` are finished or ``time`` is spent; then :meth:`finish`."""
        study = self._open()
        spent0 = float(study.user_attrs.get("spent_s", 0.0))
        started = time.perf_counter()
        deadline = math.inf if self.time is None else started + self.time * (1 - RESERVE) - spent0
        failures = 0
        while self._another(study, spent0 + time.perf_counter() - started):
            ok = self._trial(study, deadline)
            study.set_user_attr("spent_s", spent0 + time.perf_counter() - started)
            failures = 0 if ok else failures + 1
            if failures >= MAX_FAILURES:
                raise UserError(f"tune: {failures} trials in a row failed (see the lines above); "
                                f"the study {self.run_dir / 'study.db'} keeps them")
        return self.finish(study, spent0 + time.perf_counter() - started)

    def trial_config(self, trial: Any) -> Config:
        """The recipe of an Optuna ``trial``: its choices on the base (trial 0: the base itself), with
        the trial's length and its run's own settings (validation only, no progress bar)."""
        fixed = base_choices(self.space, self.base_raw) if trial.user_attrs.get("default") else None
        choose = lambda d: d.suggest(trial) if fixed is None or d.name in fixed else None  # noqa: E731
        raw = trial_recipe(self.space, self.base_raw, choose)
        for key, value in TRIAL_SETTINGS.items():
            set_key(raw, key, value)
        set_key(raw, "train.time_budget", self.trial_budget)
        raw["name"] = f"{self.base.name}_trial{trial.number:04d}"
        return validate(raw, f"trial {trial.number}")

    def _trial(self, study: Any, deadline: float = math.inf) -> bool:
        """Run one trial, stopped at ``deadline`` (see :class:`StopAtDeadline`); False when it failed (it
        is marked so; an interruption is re-raised). A trial stopped by the pruner, or by the deadline
        before its planned end, is pruned; the default, never pruned, is then complete and says so."""
        states = _optuna().trial.TrialState
        trial = study.ask()
        default = bool(trial.user_attrs.get("default"))
        run_dir = self.run_dir / "trials" / f"{trial.number:04d}"
        t0 = time.perf_counter()
        report, clock = ReportToOptuna(trial, prune=not default), StopAtDeadline(deadline)
        from .trainer import Trainer

        try:
            cfg = self.trial_config(trial)
            splits = validation_as_test(build_data(cfg))
            summary = Trainer(cfg, run_dir, splits=splits, callbacks=[report, clock, *self.callbacks]).fit()
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=states.FAIL)
            self._rerun(study, study.trials[trial.number])
            log.warning("tune: trial %d interrupted: marked failed; run the same command to resume the search "
                        "(the trial runs again)", trial.number)
            raise
        except Exception as e:  # noqa: BLE001 - one trial's error (a diverging loss) is the trial's
            if default and isinstance(e, UserError):
                study.tell(trial, state=states.FAIL)
                raise
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            study.tell(trial, state=states.FAIL)
            log.warning("tune: trial %d failed: %s: %s", trial.number, type(e).__name__, e)
            return False
        seconds = time.perf_counter() - t0
        val = {k: v for k, v in (summary.get("val") or {}).items() if isinstance(v, (int, float))}
        for key, value in (("seconds", seconds), ("val", val), ("steps", summary["last_step"]),
                           ("max_steps", summary["max_steps"]), ("run_dir", str(run_dir))):
            trial.set_user_attr(key, value)
        value = summary["best"][METRIC]
        stopped = ""
        if report.pruned_at is not None:
            stopped = f", pruned at step {report.pruned_at}"
        elif clock.stopped_at is not None and clock.stopped_at < summary["max_steps"]:
            stopped = f", stopped at step {clock.stopped_at} of {summary['max_steps']} by --time"
            trial.set_user_attr("stopped_by_time", clock.stopped_at)
        if stopped and not default:
            study.tell(trial, state=states.PRUNED)
        else:
            study.tell(trial, value)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        log.info("tune: trial %d%s: validation %s %.4f%s in %s (%s)", trial.number, " (the default)" if default else "",
                 METRIC, value, stopped, format_duration(seconds), shown)
        return True

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, study: Any, seconds: float) -> TuneResult:
        """``best.yaml``, the test of the best trial and of the default (each once), the counts."""
        states = _optuna().trial.TrialState
        complete = [t for t in study.trials if t.state == states.COMPLETE]
        if not complete:
            raise UserError(f"tune: no trial completed in {self.run_dir / 'study.db'}; see the trials' errors above")
        best = study.best_trial
        defaults = [t for t in complete if t.user_attrs.get("default")]
        default = defaults[-1] if defaults else None
        best_yaml = self.write_recipe(best, self.run_dir / "best.yaml", f"{self.base.name}_tuned")
        test = {t.number: score_on_test(Path(t.user_attrs["run_dir"]), self.run_dir / "test" / f"{t.number:04d}")
                for t in {best.number: best, **({default.number: default} if default else {})}.values()}
        counts = {name: sum(t.state == getattr(states, name.upper()) for t in study.trials)
                  for name in ("complete", "pruned", "fail")}
        return TuneResult(self.run_dir, study, default, best, test, best_yaml, counts, seconds)

    def write_recipe(self, trial: Any, path: Path, name: str) -> Path:
        """The recipe trial ``trial`` trained (its run's ``config.yaml``: the step count its budget came
        to), with the base's own evaluation and progress settings and ``name``: an ordinary recipe."""
        raw = load_config(Path(trial.user_attrs["run_dir"])).to_dict()
        for key in TRIAL_SETTINGS:
            set_key(raw, key, get_key(self.base_raw, key))
        raw["name"] = name
        save_config(validate(raw, str(path)), path)
        return path


def score_on_test(trial_dir: Path, out_dir: Path) -> Dict[str, Any]:
    """A trial's selected checkpoint scored on the test classes, once: ``out_dir/metrics.json`` is
    kept and read back when the search is run again."""
    from .runs import evaluate

    ckpt = trial_dir / "checkpoints" / "best"
    done = out_dir / "metrics.json"
    if done.is_file():
        metrics = json.loads(done.read_text())
        if metrics.get("checkpoint") == str(ckpt):
            return metrics
    return dict(evaluate(str(trial_dir / "config.yaml"), checkpoint=str(ckpt), output=str(out_dir)).result.metrics)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["Base", "METRIC", "PRUNERS", "ReportToOptuna", "Search", "StopAtDeadline", "TuneResult", "VAL_SHARE",
           "option_seconds", "score_on_test", "tune_base", "validation_as_test"]
