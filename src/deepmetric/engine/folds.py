"""``train.length_folds``: how long to train, chosen on folds of the training classes.

With a handful of training classes a validation split of two or three of them selects a checkpoint
by noise, and training on all of them to the end of the schedule can leave the embedding worse on
new classes than it was untrained (the few classes' features crowd out the rest). So the run first
trains once per fold: without the fold's classes, validating on them every ``eval_every`` steps
(step 0, the untrained network, included; at most :data:`FOLD_VAL_PER_CLASS` images of each, so that
a fold's share of a budget buys several evaluations). The folds' mean validation curve (``eval.metric``)
gives the length: its best step after the first. The run then trains on every training class for
that many steps, on the same schedule (``scheduler.total_steps`` keeps the folds' length, so the
lr at the chosen step is the one the folds measured there), and keeps the last step.

The budget covers the folds: with ``train.time_budget`` the first fold plans its steps for a
``1/(folds + 1)`` share (:func:`deepmetric.engine.budget.fit_to_budget`) and the other folds repeat
that plan; with ``train.max_steps`` each fold trains ``max_steps // (folds + 1)`` steps, evaluated
about ten times. Each fold is an ordinary run under ``RUN/folds/N/``; ``RUN/folds.json`` holds the
curves and the choice, and ``RUN/config.yaml`` the length chosen (``train.length_folds`` then
empty), so it repeats the run without the folds.

``train.fold_candidates`` makes the folds choose a recipe too: each candidate (a mapping of dotted
keys to values, ``{}`` for the recipe as it is) trains on every fold, and the candidate whose mean
curve has the best value (at its own best step) is the run's, with that length. Each of the
``folds x candidates`` fold runs then gets a ``1/(folds x candidates + 1)`` share, and each candidate
plans its own steps for it (their steps can cost differently). The run is built again for the chosen
candidate (:meth:`~deepmetric.engine.trainer.Trainer.rebuild`) unless it is the recipe itself, and its
``config.yaml`` holds the candidate's values. ``train.fold_margin_se`` makes the first candidate the
incumbent: another replaces it only by a lead of more than that many standard errors of their
fold-by-fold differences (:func:`choose_candidate`).

``train.fold_retrieval`` makes the folds choose what the run retrieves: every validation of a fold run
also scores the pooled features under the projection (``model.retrieval: pooled``), and where their
mean curve, at its own best step, leads the embedding's by more than ``train.fold_margin_se`` standard
errors of the fold-by-fold differences, the run retrieves them, at that length
(:func:`choose_retrieval`). Trained on a handful of classes, the projection narrows to what tells
those apart; the features under it can keep more of what new classes need.

``train.fold_members`` spends what an early stop leaves of the run's share: when that share holds
several runs of the chosen length (:func:`member_count`), the run trains that many networks
(``model.members``, at most ``fold_members``), each for that length on its own initial weights and
its own loss, and their embeddings side by side are its embedding. Two seeds of a few-class run
differ by as much as training gains; their ensemble averages that away.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..config import Config, ConfigError
from ..core.files import atomic_write
from .budget import SAFETY, short_run_warmup

log = logging.getLogger("deepmetric")

#: evaluations per fold when the length is a step count (a time budget plans its own)
FOLD_EVALUATIONS = 10
#: images of each held-out class a fold scores (``data.val_per_class``, unless the recipe sets it):
#: cheap evaluations, so a fold's share of a budget buys several of them
FOLD_VAL_PER_CLASS = 100


@dataclass
class FoldLength:
    """What the folds found: each fold's validation curve ``[(step, value)]`` (step 0: untrained),
    their mean at the steps they share, and the chosen length."""

    metric: str
    steps: int
    schedule_steps: int
    curves: List[List[Tuple[int, float]]]
    mean: List[Tuple[int, float]] = field(default_factory=list)
    warmup_steps: int = 0
    #: which of ``train.fold_candidates`` (0 without any), and each candidate's mean validation value
    #: at its own chosen step (``None``: not tried, its share of the budget too short)
    candidate: int = 0
    candidates: List[Optional[float]] = field(default_factory=list)
    #: seconds a training step of the first fold took (a time budget's plan; 0 without one)
    step_s: float = 0.0
    #: ``train.fold_extend``: what the run trains instead of ``steps`` (0: not extended)
    extended: int = 0
    #: ``train.fold_members``: the networks the run trains for ``steps`` each (``model.members``)
    members: int = 1
    #: ``train.fold_margin_se``, and each candidate's standard error against the first
    margin_se: float = 0.0
    errors: List[float] = field(default_factory=list)
    #: the CPU threads the candidate's fold runs computed with (``train.threads``; 0: torch's default)
    threads: int = 0
    #: ``train.fold_retrieval``: each fold's validation curve of the pooled features (empty without it)
    pooled_curves: List[List[Tuple[int, float]]] = field(default_factory=list)
    #: ... what the run retrieves (``model.retrieval``); ``curves``, ``mean`` and ``steps`` are its own
    retrieval: str = "embedding"
    #: ... and what the choice saw: per retrieval (embedding, pooled) its length, its folds' values there
    #: and their mean, and the standard error of the pooled features' fold-by-fold lead
    retrieval_choice: Dict[str, Any] = field(default_factory=dict)

    @property
    def untrained(self) -> float:
        return self.mean[0][1]

    @property
    def chosen(self) -> float:
        """The folds' mean validation value at the chosen step."""
        return dict(self.mean)[self.steps]

    def summary(self) -> Dict[str, Any]:
        """What a run's summary records (``length_folds``)."""
        return {"folds": len(self.curves), "metric": self.metric, "steps": self.steps,
                "schedule_steps": self.schedule_steps, "val": self.chosen, "untrained": self.untrained,
                "candidate": self.candidate, "candidates": self.candidates, "extended": self.extended,
                "members": self.members, "retrieval": self.retrieval}

    def describe(self, values: Optional[Dict[str, Any]] = None) -> str:
        """The run's note; ``values``: the chosen candidate's (``train.fold_candidates``)."""
        best = self.chosen
        text = (f"length chosen on {len(self.curves)} folds of the training classes: {self.steps} of "
                f"{self.schedule_steps} steps (mean validation {self.metric} {best:.4f}; untrained "
                f"{self.untrained:.4f}, after {self.schedule_steps} steps {self.mean[-1][1]:.4f})")
        if len(self.candidates) > 1:
            what = ", ".join(f"{k}={json.dumps(v)}" for k, v in (values or {}).items()) or "the recipe as it is"
            scores = ", ".join("not tried" if v is None else f"{v:.4f}" for v in self.candidates)
            text += (f"; of {len(self.candidates)} candidates (train.fold_candidates: {scores}) the folds chose "
                     f"{self.candidate + 1}: {what}")
            if self.margin_se:
                text += self._margin_note()
        if self.retrieval_choice:
            text += self._retrieval_note()
        if self.extended:
            text += (f"; the folds' curve was still at its best at their last step, so the run trains for the rest "
                     f"of the budget instead: {self.extended} steps (train.fold_extend)")
        if self.members > 1:
            text += (f"; the run's share of the budget holds {self.members} networks of {self.steps} steps, so it "
                     f"trains an ensemble of {self.members} (train.fold_members, model.members): their embeddings "
                     f"side by side, {self.members} times the dimension")
        if self.untrained > best:
            text += ("; no length beat the untrained network on the held-out classes: train on more classes, "
                     "or start from pretrained weights (model.pretrained=PATH)")
        return text

    def _retrieval_note(self) -> str:
        """``train.fold_retrieval`` in the note: the two retrievals' mean values, the margin, the choice."""
        c = self.retrieval_choice
        emb, pooled = c["embedding"], c["pooled"]
        lead = pooled["val"] - emb["val"]
        margin = (f"the margin of {self.margin_se:g} standard error{'s' if self.margin_se != 1 else ''} of the "
                  f"folds' differences ({self.margin_se * c['se']:.4f})")
        why = (f"ahead by {lead:.4f}, more than {margin}" if self.retrieval == "pooled" else
               f"ahead by {lead:.4f}, within {margin}" if lead > 0 else "not ahead")
        return (f"; the pooled features under the projection scored {pooled['val']:.4f} on the folds (step "
                f"{pooled['steps']}) against the embedding's {emb['val']:.4f} (step {emb['steps']}): {why}, so the "
                f"run retrieves the {'pooled features' if self.retrieval == 'pooled' else 'embedding'} "
                f"(train.fold_retrieval, model.retrieval={self.retrieval})")

    def _margin_note(self) -> str:
        """``train.fold_margin_se`` in the note: the chosen later candidate's lead and the margin it
        passed, or, where the first was kept, the best later candidate's lead within the margin."""
        ahead = [j for j in range(1, len(self.candidates))
                 if self.candidates[j] is not None and self.candidates[j] > self.candidates[0]]
        if not self.candidate and not ahead:
            return ""
        j = self.candidate or max(ahead, key=lambda i: self.candidates[i])
        lead = self.candidates[j] - self.candidates[0]
        what = (f"ahead of candidate 1 by {lead:.4f}, more than" if self.candidate
                else f"candidate {j + 1} was ahead by {lead:.4f}, within")
        return (f" ({what} {self.margin_se:g} standard error{'s' if self.margin_se != 1 else ''} of the folds' "
                f"differences, {self.margin_se * self.errors[j]:.4f}: train.fold_margin_se)")


def mean_curve(curves: List[List[Tuple[int, float]]]) -> List[Tuple[int, float]]:
    """The folds' mean validation value at every step all of them evaluated.

    >>> mean_curve([[(0, 0.5), (10, 0.7), (20, 0.6)], [(0, 0.3), (10, 0.5), (20, 0.6)]])
    [(0, 0.4), (10, 0.6), (20, 0.6)]
    """
    shared = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    return [(s, round(float(np.mean([dict(c)[s] for c in curves])), 12)) for s in shared]


def choose_candidate(values: List[List[float]], margin_se: float = 0.0) -> Tuple[int, List[float]]:
    """Which candidate the folds keep, and each later candidate's standard error against the first.

    ``values[j]``: candidate ``j``'s value on each fold (at its own chosen step). A later candidate
    is eligible where its mean beats the first's by more than ``margin_se`` standard errors of their
    fold-by-fold differences (``std(d, ddof=1) / sqrt(folds)``; 0 with one fold); the eligible
    candidate with the best mean is kept, the first of equals, and the first where none is eligible.
    With ``margin_se=0`` that is the best mean.

    >>> choose_candidate([[0.96, 0.97, 0.97], [0.99, 0.99, 0.95]])[0]
    1
    >>> j, se = choose_candidate([[0.96, 0.97, 0.97], [0.99, 0.99, 0.95]], margin_se=1.0)
    >>> j, round(se[1], 4)
    (0, 0.0153)
    >>> choose_candidate([[0.72, 0.70, 0.75], [0.79, 0.80, 0.78]], margin_se=1.0)[0]
    1
    """
    means = [float(np.mean(v)) for v in values]
    errors = [0.0]
    for v in values[1:]:
        d = np.asarray(v, dtype=float) - np.asarray(values[0], dtype=float)
        errors.append(float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0)
    eligible = [0] + [j for j in range(1, len(values)) if means[j] - means[0] > margin_se * errors[j]]
    return max(eligible, key=lambda j: (means[j], -j)), errors


def choose_retrieval(result: FoldLength, margin_se: float = 0.0) -> FoldLength:
    """``train.fold_retrieval``: the embedding (the incumbent, at ``result.steps``) against the pooled
    features (at their own mean curve's best step), by :func:`choose_candidate` with ``margin_se``.
    Where the pooled features win, ``result`` takes their curves, mean and length; either way it
    records the choice (``retrieval``, ``retrieval_choice``).

    >>> r = FoldLength("map@r", 10, 20, [[(0, .5), (10, .7), (20, .6)], [(0, .5), (10, .6), (20, .6)]],
    ...                [(0, .5), (10, .65), (20, .6)],
    ...                pooled_curves=[[(0, .6), (10, .7), (20, .8)], [(0, .6), (10, .7), (20, .75)]])
    >>> r = choose_retrieval(r, 1.0)
    >>> r.retrieval, r.steps, r.chosen, round(r.retrieval_choice["embedding"]["val"], 4)
    ('pooled', 20, 0.775, 0.65)
    """
    pooled_mean = mean_curve(result.pooled_curves)
    pooled_steps = choose_length(pooled_mean)
    values = [[dict(c)[result.steps] for c in result.curves], [dict(c)[pooled_steps] for c in result.pooled_curves]]
    pick, errors = choose_candidate(values, margin_se)
    result.retrieval_choice = {
        "embedding": {"steps": result.steps, "val": float(np.mean(values[0])), "folds": values[0]},
        "pooled": {"steps": pooled_steps, "val": float(np.mean(values[1])), "folds": values[1]}, "se": errors[1]}
    if pick == 1:
        result.retrieval = "pooled"
        result.curves, result.mean, result.steps = result.pooled_curves, pooled_mean, pooled_steps
    return result


def choose_length(mean: List[Tuple[int, float]]) -> int:
    """The step of the best mean value after step 0 (the earliest of equals).

    >>> choose_length([(0, 0.9), (10, 0.6), (20, 0.7), (30, 0.7)])
    20
    """
    trained = [(s, v) for s, v in mean if s > 0]
    if not trained:
        raise ValueError("the folds evaluated no trained step")
    return max(trained, key=lambda sv: (sv[1], -sv[0]))[0]


def _fold_config(cfg: Config, fold: List[Any], n_train: int, i: int) -> Config:
    left = n_train - len(fold)
    if left < 2:
        raise ConfigError(f"train.length_folds: fold {i + 1} ({fold}) leaves {left} training class"
                          f"{'' if left == 1 else 'es'}; a fold must leave at least 2 to train on")
    data = cfg.data.model_copy(update={"val_classes": list(fold), "val_per_class": cfg.data.val_per_class or
                                       FOLD_VAL_PER_CLASS, "classes_per_batch": min(cfg.data.classes_per_batch, left)})
    train = cfg.train.model_copy(update={"length_folds": [], "fold_retrieval": False, "progress": False})
    return cfg.model_copy(update={"data": data, "train": train, "name": f"{cfg.name}-fold{i + 1}",
                                  "eval": cfg.eval.model_copy(update={"untrained": True})})


def validation_curve(trainer: Any, metric: str) -> List[Tuple[int, float]]:
    """``[(step, value)]`` of a finished run's validation ``metric``: step 0 (its untrained
    evaluation), then every evaluation it recorded."""
    rows = [(int(r["step"]), float(r["eval"][metric])) for r in trainer.history
            if r.get("split") == "val" and "eval" in r and r["step"] > 0]
    return [(0, float(trainer.untrained["val"][metric]))] + sorted(dict(rows).items())


def fold_run_share(cfg: Config, runs: int) -> float:
    """The share of the budget each of ``runs`` fold runs gets: ``train.fold_share / runs``, or
    ``1 / (runs + 1)`` without one.

    >>> fold_run_share(Config(), 6), fold_run_share(Config(train={"fold_share": 0.5}), 5)
    (0.14285714285714285, 0.1)
    """
    share = cfg.train.fold_share
    return share / runs if share else 1.0 / (runs + 1)


def fold_steps(cfg: Config, runs: int) -> int:
    """Each fold run's steps when the length is a step count: its share of ``train.max_steps``.

    >>> fold_steps(Config(train={"max_steps": 40, "fold_share": 0.6}), 3)
    8
    """
    return max(1, int(cfg.train.max_steps * fold_run_share(cfg, runs) + 1e-9))


def _candidate_folds(trainer: Any, cfg: Config, folds: List[List[Any]], first: int, runs: int,
                     budget: float) -> Optional[FoldLength]:
    """Train ``cfg`` (a candidate) on each fold, as runs ``first + 1 ...`` of ``runs`` under
    ``RUN/folds/``; its :class:`FoldLength`, or ``None`` for a later candidate (``first > 0``) whose
    share of a time budget is too short for one evaluation (the trainer's notes say so)."""
    n_train = trainer.splits.num_classes
    share = fold_run_share(cfg, runs)
    metric = cfg.eval.metric
    curves: List[List[Tuple[int, float]]] = []
    pooled: List[List[Tuple[int, float]]] = []
    plan: Dict[str, Any] = {}
    for i, fold in enumerate(folds):
        n = first + i + 1
        fcfg = _fold_config(cfg, fold, n_train, i)
        if i == 0 and budget:  # each candidate plans its own steps: their steps cost differently
            fcfg = fcfg.model_copy(update={"train": fcfg.train.model_copy(update={"time_budget": f"{budget * share:g}s"})})
        else:
            steps = plan.get("max_steps") or fold_steps(cfg, runs)
            every = plan.get("eval_every") or max(1, steps // FOLD_EVALUATIONS)
            update = {"train": fcfg.train.model_copy(update={"time_budget": None, "max_steps": steps,
                                                             "eval_every": every,
                                                             "threads": plan.get("threads") or fcfg.train.threads})}
            if "warmup_steps" in plan:
                update["scheduler"] = fcfg.scheduler.model_copy(update={"warmup_steps": plan["warmup_steps"]})
            fcfg = fcfg.model_copy(update=update)
        log.info("train.length_folds: fold run %d of %d, validating on %s", n, runs, fold)
        fold_trainer = type(trainer)(fcfg, trainer.run_dir / "folds" / str(n))  # a run of the same kind
        # its test rows score its held-out classes: the data set's test classes are not the folds' to
        # see, and scoring them (the untrained row and the selected step) took 25 s of a 45 s fold run
        # on Fashion-MNIST's 5,000 test images
        fold_trainer.parts.evaluator = fold_trainer.parts.val_evaluator
        fold_trainer.notes.append("a fold run: its test rows score its held-out classes (its validation split)")
        if cfg.train.fold_retrieval:  # every validation also scores the pooled features
            fold_trainer.pooled_curve = {}
        try:
            fold_trainer.fit()
        except ConfigError as e:
            need = re.search(r"too short for one evaluation: (.*); give at least (\d+)s", str(e))
            if i == 0 and budget and need and first:  # a later candidate: the first one's folds have run, so
                # the budget held them; this one's steps cost more than its share holds. Failing now would
                # throw away the folds done: the run goes on without this candidate, and says so
                trainer.notes.append(f"train.fold_candidates: candidate {first // len(folds) + 1} was not tried: "
                                     f"its fold runs' share of the budget ({budget * share:.3g} s each) is too "
                                     f"short for one evaluation of it ({need.group(1)})")
                log.warning("%s", trainer.notes[-1])
                return None
            if i == 0 and budget and need:
                part = f"{share:.3g}" if cfg.train.fold_share else f"1/{runs + 1}"
                raise ConfigError(f"train.time_budget={trainer.cfg.train.time_budget}: too short for the folds that "
                                  f"choose the length (train.length_folds): each of the {runs} gets {part} "
                                  f"of it, too little for one evaluation ({need.group(1)}); give at least "
                                  f"{math.ceil(int(need.group(2)) / share)}s, or train.length_folds=[]") from None
            raise
        except KeyboardInterrupt:
            log.warning("interrupted in fold run %d of %d: the folds do not resume; `deepmetric train` runs them "
                        "again from the start", n, runs)
            raise
        if i == 0:
            plan = {"max_steps": fold_trainer.cfg.train.max_steps, "eval_every": fold_trainer.cfg.train.eval_every,
                    "warmup_steps": fold_trainer.cfg.scheduler.warmup_steps,
                    "step_s": fold_trainer.budget_plan.step_s if fold_trainer.budget_plan else 0.0,
                    "threads": fold_trainer.cfg.train.threads}
        curves.append(validation_curve(fold_trainer, metric))
        if fold_trainer.pooled_curve is not None:
            pooled.append(sorted(fold_trainer.pooled_curve.items()))
        del fold_trainer
        gc.collect()
    mean = mean_curve(curves)
    return FoldLength(metric, choose_length(mean), plan["max_steps"], curves, mean, warmup_steps=plan["warmup_steps"],
                      step_s=plan["step_s"], threads=plan["threads"], pooled_curves=pooled)


def extended_steps(cfg: Config, result: FoldLength, runs: int, budget: Optional[float], spent: float) -> int:
    """``train.fold_extend``: the steps the run trains when the folds' mean curve is at its best at
    its last step, for what is left of the budget (``spent`` seconds gone on the folds, at the chosen
    candidate's seconds a step; or ``train.max_steps`` less the fold runs' steps); 0 when the curve
    turned down, or nothing longer is left.

    >>> r = FoldLength("map@r", 20, 20, [], [(0, 0.5), (10, 0.6), (20, 0.7)], step_s=0.5)
    >>> extended_steps(Config(train={"fold_extend": True}), r, 3, 100.0, 40.0)
    110
    >>> extended_steps(Config(train={"fold_extend": True, "max_steps": 400, "fold_share": 0.5}), r, 4, None, 0.0)
    200
    """
    if not cfg.train.fold_extend or not result.mean or result.steps != result.mean[-1][0]:
        return 0
    if budget:
        if result.step_s <= 0:
            return 0
        steps = int((budget * (1.0 - SAFETY) - spent) / result.step_s)
    else:
        steps = cfg.train.max_steps - runs * fold_steps(cfg, runs)
    return steps if steps > result.steps else 0


def member_count(cfg: Config, result: FoldLength, runs: int) -> int:
    """``train.fold_members``: how many networks of the chosen length the run's share of the budget
    holds (its steps: a fold run's ``schedule_steps`` scaled from a fold run's share to what the fold
    runs leave), at most ``train.fold_members``; 1 when the run is extended (the rest of the budget is
    its length) or ``model.members`` is set.

    >>> r = FoldLength("map@r", 120, 400, [], [])
    >>> member_count(Config(train={"fold_members": 4}), r, 6), member_count(Config(train={"fold_members": 2}), r, 6)
    (3, 2)
    >>> member_count(Config(train={"fold_members": 4, "fold_share": 0.5}), r, 5)
    4
    """
    if cfg.train.fold_members < 2 or result.extended or cfg.model.members > 1 or result.steps <= 0:
        return 1
    share = fold_run_share(cfg, runs)
    room = result.schedule_steps * (1.0 - runs * share) / share
    return max(1, min(cfg.train.fold_members, int(room / result.steps + 1e-9)))


def run_folds(trainer: Any) -> FoldLength:
    """Train ``trainer``'s folds (``train.length_folds``; every candidate of ``train.fold_candidates``
    on each), choose the candidate and the length, and set the trainer to them: its config
    (the candidate's values, ``train.max_steps``, ``scheduler.total_steps``, no budget, no folds),
    its schedule, and its parts where the candidate is not the recipe itself."""
    from ..config import with_candidate
    from .budget import CLOCK, budget_seconds
    from .schedule import LRSchedule

    started = CLOCK()
    cfg = trainer.cfg
    given = [part for part, source in trainer.sources.items() if source == "python"]
    if given:  # the folds are built from the recipe: they would train something else
        raise ConfigError(f"train.length_folds builds its folds from the recipe, and this run's {given[0]} is a "
                          f"Python object; set train.length_folds=[] (and train.max_steps)")
    folds = [list(f) for f in cfg.train.length_folds]
    candidates = cfg.train.fold_candidates
    configs = [with_candidate(cfg, j) for j in range(len(candidates))] if candidates else [cfg]
    runs = len(folds) * len(configs)
    budget = budget_seconds(cfg)
    results = [_candidate_folds(trainer, c, folds, j * len(folds), runs, budget) for j, c in enumerate(configs)]
    tried = [j for j, r in enumerate(results) if r is not None]  # the first always is
    values = [[dict(c)[r.steps] for c in r.curves] for r in results if r is not None]  # each fold at its length
    pick, found = choose_candidate(values, cfg.train.fold_margin_se)
    best, errors = tried[pick], [0.0] * len(results)
    for j, e in zip(tried, found):
        errors[j] = e
    result = results[best]
    result.candidate, result.candidates = best, [None if r is None else r.chosen for r in results]
    result.margin_se, result.errors = cfg.train.fold_margin_se, errors
    by_candidate = [{"tried": False} if r is None else  # each candidate's embedding, before the retrieval's choice
                    {"steps": r.steps, "val": r.chosen, "folds": values[tried.index(j)], "se": errors[j],
                     "curves": r.curves, "mean": r.mean} for j, r in enumerate(results)]
    result.retrieval = configs[best].model.retrieval
    if cfg.train.fold_retrieval:
        choose_retrieval(result, cfg.train.fold_margin_se)
    result.extended = extended_steps(cfg, result, runs, budget, CLOCK() - started)
    result.members = member_count(cfg, result, runs)
    atomic_write(trainer.run_dir / "folds.json", json.dumps(
        {"folds": folds, "metric": result.metric, "candidates": candidates, "candidate": best,
         "steps": result.steps, "schedule_steps": result.schedule_steps, "extended": result.extended,
         "members": result.members,
         "curves": result.curves, "mean": result.mean,
         "margin_se": cfg.train.fold_margin_se,
         "retrieval": result.retrieval, "retrieval_choice": result.retrieval_choice,
         "by_candidate": by_candidate},
        indent=1))
    trainer.notes.append(result.describe(candidates[best] if candidates else None))
    log.info("%s", trainer.notes[-1])
    chosen = configs[best]
    steps, total, warmup = result.steps, result.schedule_steps, result.warmup_steps
    if result.extended:  # the rest of the budget, on a schedule of that length (warm-up as fit_to_budget sets it)
        steps = total = result.extended
        warmup = short_run_warmup(chosen.scheduler.warmup_steps, steps)
    scheduler = chosen.scheduler.model_copy(update={"total_steps": total, "warmup_steps": warmup})
    train = chosen.train.model_copy(update={"max_steps": steps, "time_budget": None, "length_folds": [],
                                            "fold_candidates": [], "fold_retrieval": False, "eval_every": 0,
                                            "threads": result.threads or chosen.train.threads})
    final = chosen.model_copy(update={"train": train, "scheduler": scheduler})
    model = {**({"members": result.members} if result.members > 1 else {}),  # else the recipe's own count
             **({"retrieval": result.retrieval} if result.retrieval != final.model.retrieval else {})}
    if model:
        final = final.model_copy(update={"model": final.model.model_copy(update=model)})
    if (candidates and candidates[best]) or final.model != chosen.model:  # another model or recipe: build anew
        trainer.rebuild(final)
    else:
        trainer.cfg = final
        trainer.schedule = LRSchedule(scheduler, [trainer.optimizers["main"]], steps)
    return result


__all__ = ["FOLD_EVALUATIONS", "FOLD_VAL_PER_CLASS", "FoldLength", "choose_candidate", "choose_length", "choose_retrieval", "extended_steps", "fold_run_share",
           "fold_steps", "mean_curve", "member_count", "run_folds", "validation_curve"]
