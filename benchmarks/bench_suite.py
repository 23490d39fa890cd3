"""The suite: ``deepmetric train DIR``'s defaults chosen on some data sets, proven on the others.

Run by hand, not a test (hours on a 2-core CPU for the whole suite):

    python benchmarks/bench_suite.py prepare --out /tmp/suite      # quickstart glyphs, digits, Fashion folders
    python benchmarks/make_glyph_benchmark.py --out /tmp/suite/cjk  # CJK glyphs
    python benchmarks/make_icon_benchmark.py --out /tmp/suite/icons # icons across Debian icon themes (colour)
    python benchmarks/make_math_benchmark.py --out /tmp/suite/math  # maths symbols across OpenType maths fonts
    python benchmarks/bench_suite.py run --datasets icons math --seeds 0 1 --budget 2m --threads 1 --json a.json \\
        --variant mem "losses.0.memory={size: 4096}"
    python benchmarks/bench_suite.py table a.json b.json ...         # leave-one-data-set-out

Every data set is an image folder that ``deepmetric train DIR`` reads as a user's would, with a
zero-shot split of its own (:data:`DATASETS`: half the classes by a hash of their names, or the data
set's customary split). On each, at one wall-clock budget on this machine:

- ``auto``: ``deepmetric train DIR`` (:func:`deepmetric.engine.auto.auto_config`, then the Trainer),
  with ``train.time_budget``; ``--variant NAME key=value ...`` adds candidate defaults as systems
  of their own (``auto_NAME``);
- ``pml``: a plain PyTorch loop with pytorch-metric-learning's ``MultiSimilarityLoss`` and
  ``MultiSimilarityMiner`` (its recommended pairing and defaults) and its ``MPerClassSampler``, on the
  auto recipe's network, input, batch, optimizer and schedule, without augmentation, reading the
  same images through the same dataset; the same budget, measured and planned the same way
  (:func:`deepmetric.engine.budget.plan_steps`), the same model selection;
- ``readme``: the README's own-images command as it was before the automatic recipe (the
  quickstart recipe at 64 px with the ``imagenet`` preset, 4 x 4 batches, 300 steps);
- ``untrained``: the network before the first step (the auto run's step 0).

Model selection follows the automatic recipe's rule (a validation split of the training classes; when
they are few, a length chosen on folds of them, ``train.length_folds``, which the PML loop, keeping
its last step, does not have; ``curves`` measures that rule on held-out folds). Choosing defaults
needs a validation score on every data set, so a data set with few training classes also gets
*selection runs* (``--selection``): its training classes less a rotating fold of two, which
validate. ``table`` then does leave-one-data-set-out: for each data set, the candidate with the best
mean rank of validation MAP@R on the *other* data sets, scored on this one's test split beside the
PML loop, the untrained network and the README command.

``run --classes K --tasks N`` judges the few-class rule at test on a many-class data set: task t trains
on K of its training classes and tests on K of its test classes (:func:`test_tasks`), so the automatic
recipe sees K training classes (below 30: folds), and the test classes are ones no choice has seen.
``run --rotations N`` judges a data set on N rotated zero-shot splits of its classes instead of its
fixed one (:func:`rotated_tasks`; Fashion-MNIST's fixed split trains on garments and tests on shoes and
bags, which says more about that split than about a recipe).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepmetric.config import Config, load_config  # noqa: E402
from deepmetric.core.files import atomic_write  # noqa: E402
from deepmetric.engine.auto import auto_config, hash_order  # noqa: E402
from deepmetric.engine.budget import measure_budget, plan_steps  # noqa: E402
from deepmetric.engine.build import build_data, build_model, seed_everything  # noqa: E402
from deepmetric.engine.evaluator import Evaluator  # noqa: E402
from deepmetric.engine.schedule import LRSchedule  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402

SHOWN = ("recall@1", "map@r", "map", "r_precision")
#: what ``table`` compares with the untrained network: every metric of the test report
METRICS = ("map@r", "map", "r_precision", "recall@1", "recall@2", "recall@4", "recall@8", "mrr")


@dataclass(frozen=True)
class SuiteData:
    """A data set of the suite: its folder (under ``--root``) and its zero-shot split: ``hash``
    (half the classes, by :func:`hash_order`, are tested), ``first_half`` (the first half of the
    sorted folders train, as the glyph benchmarks do) or explicit ``train``/``test`` folder names."""

    folder: str
    split: str = "hash"
    train: Sequence[str] = ()
    test: Sequence[str] = ()
    what: str = ""


FASHION_NAMES = ("0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker",
                 "8_bag", "9_ankle_boot")
DATASETS: Dict[str, SuiteData] = {
    "qs_glyphs": SuiteData("qs_glyphs", "first_half", what="the quickstart's characters in matplotlib's 16 faces; "
                           "Latin and IPA train, Greek, Cyrillic and symbols are tested"),
    "cjk": SuiteData("cjk", "first_half", what="3,500 Chinese characters in up to 12 distinct CJK faces"),
    "fashion": SuiteData("fashion", "explicit", FASHION_NAMES[:5], FASHION_NAMES[5:],
                         what="Fashion-MNIST: garments train (1,200 each from the training file), shoes, shirts "
                              "and bags are tested (1,000 each from the test file)"),
    "digits": SuiteData("digits", "explicit", tuple(str(d) for d in range(5)), tuple(str(d) for d in range(5, 10)),
                        what="scikit-learn's 8x8 handwritten digits, 0-4 train, 5-9 tested"),
    "icons": SuiteData("icons", "hash", what="freedesktop icons drawn by the Debian icon themes (colour)"),
    "math": SuiteData("math", "hash", what="maths symbols in the OpenType maths fonts"),
}

README_COMMAND = ["data.format=image_folder", "data.options={}", "data.transform=imagenet", "data.image_size=[64,64]",
                  "model.in_chans=3", "data.classes_per_batch=4", "data.samples_per_class=4", "train.max_steps=300"]


# -- the data sets -------------------------------------------------------------------------------------

def class_folders(root: Path) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


#: ``run --screen``: only this many test classes are scored (candidates are compared on validation; the
#: test split, never trained on, only costs time then)
SCREEN_TEST_CLASSES = 40
SCREEN = False
#: ``--pml-like NAME``: the PML loop runs on the recipe of candidate ``auto_NAME`` (default: ``auto``)
PML_LIKE = "auto"


def split_classes(name: str, root: Path) -> Tuple[List[str], List[str]]:
    """``(training classes, test classes)`` of data set ``name`` in folder ``root``."""
    d = DATASETS[name]
    names = class_folders(root)
    if d.split == "explicit":
        train, test = list(d.train), list(d.test)
    elif d.split == "first_half":
        train, test = names[: len(names) // 2], names[len(names) // 2:]
    else:
        order = hash_order(names)
        test = sorted(order[: len(order) // 2])
        train = sorted(set(names) - set(test))
    if SCREEN:
        test = test[:SCREEN_TEST_CLASSES]
    return train, test


def split_overrides(name: str, root: Path) -> List[str]:
    """``data.train_classes`` / ``data.test_classes`` of data set ``name`` in folder ``root``."""
    train, test = split_classes(name, root)
    return [f"data.train_classes={json.dumps(train)}", f"data.test_classes={json.dumps(test)}"]


def selection_fold(name: str, root: Path, seed: int) -> List[str]:
    """A rotating validation fold of two training classes, for data sets whose training classes are
    too few for the automatic recipe to validate on (their candidates still need a validation score)."""
    train = split_classes(name, root)[0]
    fold = [train[(2 * seed + j) % len(train)] for j in range(2)]
    return [f"data.val_classes={json.dumps(fold)}"]


def prepare(out: Path) -> None:
    """The folders of the data sets that come as arrays: the quickstart's glyphs, digits, Fashion-MNIST."""
    from PIL import Image

    from deepmetric.data.formats.arrays import FASHION_MNIST_DEFAULT, read_idx
    from deepmetric.data.glyphs import write_glyph_folder

    t0 = time.perf_counter()
    write_glyph_folder(out / "qs_glyphs")
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = out / "digits" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img * 16.0, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    base = Path(FASHION_MNIST_DEFAULT)
    # the training classes' first 1,200 images of the training file (a validation fold of two classes
    # is then 2,400 images), the test classes' 1,000 of the test file each
    for part, classes, keep in (("train", range(5), 1200), ("t10k", range(5, 10), 1000)):
        images = read_idx(_idx(base, f"{part}-images-idx3-ubyte"))
        labels = read_idx(_idx(base, f"{part}-labels-idx1-ubyte"))
        for c in classes:
            folder = out / "fashion" / FASHION_NAMES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == c)[:keep]:
                Image.fromarray(images[i]).save(folder / f"{part}_{i:05d}.png")
    print(f"wrote {out}/qs_glyphs, digits, fashion in {time.perf_counter() - t0:.0f} s")


def _idx(base: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (base / name).is_file():
            return base / name
    raise SystemExit(f"bench_suite prepare: {base / stem} not found (apt-get install dataset-fashion-mnist)")


# -- the systems ---------------------------------------------------------------------------------------

def auto_recipe(root: Path, name: str, seed: int, budget: str, extra: Sequence[str]) -> Config:
    """The automatic recipe of ``root`` with the data set's split, the seed and the budget; ``extra``
    items ``defaults.KEY=VALUE`` change :data:`deepmetric.engine.auto.DEFAULTS` for this recipe (a
    candidate default, which the recipe then applies with its rules), the others are overrides."""
    import copy

    from deepmetric.config import parse_value
    from deepmetric.engine import auto

    patches = [e for e in extra if e.startswith("defaults.")]
    overrides = split_overrides(name, root) + [f"seed={seed}", f"data.val_seed={seed}", f"train.time_budget={budget}",
                                               "train.progress=false", *[e for e in extra if e not in patches]]
    saved = copy.deepcopy(auto.DEFAULTS)
    try:
        for item in patches:
            key, _, text = item[len("defaults."):].partition("=")
            if key not in auto.DEFAULTS:
                raise SystemExit(f"bench_suite: no default {key!r} (valid: {', '.join(auto.DEFAULTS)})")
            auto.DEFAULTS[key] = parse_value(text)
        return auto_config(root, overrides).config
    finally:
        auto.DEFAULTS.clear()
        auto.DEFAULTS.update(saved)


def _summary_record(trainer: Trainer, summary: Dict[str, Any], wall: float) -> Dict[str, Any]:
    logs = [r for r in trainer.history if "images_per_s" in r]
    return {"test": summary["metrics"], "val": summary.get("val"), "untrained": summary.get("untrained"),
            "step": summary["step"], "max_steps": summary["max_steps"], "budget": summary.get("budget"),
            "members": trainer.cfg.model.members,
            "images_per_s": statistics.fmean(r["images_per_s"] for r in logs) if logs else None, "wall_s": wall}


def run_trainer(cfg: Config, run_dir: Path) -> Dict[str, Any]:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    summary = trainer.fit()
    return _summary_record(trainer, summary, time.perf_counter() - t0)


class PMLLoop:
    """The PML loop (see the module docstring): built like the automatic recipe's run (the same
    splits, network, input, batch, optimizer and schedule), without augmentation."""

    def __init__(self, cfg: Config) -> None:
        from bench_fidelity import pml_recipe
        from pytorch_metric_learning.samplers import MPerClassSampler
        from torch.utils.data import DataLoader

        self.started = time.perf_counter()
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"transform": "tensor"})})  # no augmentation
        self.cfg = cfg
        seed_everything(cfg.seed)  # MPerClassSampler draws from numpy's global generator
        splits = build_data(cfg)
        self.model = build_model(cfg)
        self.loss_fn, self.miner = pml_recipe("pml_ms")  # MultiSimilarityLoss + MultiSimilarityMiner, PML's defaults
        o = cfg.optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        d = cfg.data
        self.batch = d.classes_per_batch * d.samples_per_class
        self.val = Evaluator(cfg, splits.val) if splits.val is not None else None
        self.test = Evaluator(cfg, splits)
        sampler = MPerClassSampler(splits.train.labels, m=d.samples_per_class, batch_size=self.batch,
                                   length_before_new_iter=self.batch * 500)

        def batches():
            while True:  # MPerClassSampler draws a new plan of 500 batches each pass
                yield from DataLoader(splits.train, batch_size=self.batch, sampler=sampler, drop_last=True, num_workers=0)

        self.loader = batches()
        self.schedule = LRSchedule(cfg.scheduler, [self.opt], 10 ** 9)  # the warm-up does not depend on the length
        self.k, self.train_s = 0, 0.0

    def step(self) -> float:
        t0 = time.perf_counter()
        images, labels, _ = next(self.loader)
        self.schedule.apply(self.k)
        emb = self.model(images)
        loss = self.loss_fn(emb, labels, self.miner(emb, labels))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.k += 1
        return time.perf_counter() - t0

    def measure(self, budget_s: float, time_test: bool = True):
        """The untrained evaluations and the first twelve steps (in the warm-up, so independent of the
        length) timed, and the plan: what the Trainer's ``train.time_budget`` does (``time_test``:
        evaluate the test split too, the untrained row; a calibration needs it only without validation)."""
        clock = budget_clock()
        started = t0 = clock()
        self.untrained_val = self.val.evaluate(self.model) if self.val is not None else None
        eval_s = clock() - t0
        t0 = clock()
        self.untrained = (self.test.run(self.model, neighbours=False).metrics
                          if time_test or self.val is None else None)
        test_s = clock() - t0
        self.model.train()
        timed = []
        for _ in range(12):
            t0 = clock()
            self.train_s += self.step()
            timed.append(clock() - t0)
        # the test evaluations are not training: the same accounting as the Trainer's
        return plan_steps(budget_s, clock() - started - test_s, float(np.median(timed[2:])),
                          eval_s if self.val is not None else test_s, test_s)

    def train(self, max_steps: int, eval_every: int) -> Dict[str, Any]:
        cfg = self.cfg
        self.schedule = LRSchedule(cfg.scheduler, [self.opt], max_steps)
        best, best_step, best_state, best_val = None, None, None, None
        while self.k < max_steps:
            self.train_s += self.step()
            done = self.k
            if self.val is not None and (done % eval_every == 0 or done == max_steps):
                metrics = self.val.evaluate(self.model)
                self.model.train()
                if best is None or metrics[cfg.eval.metric] > best:
                    best, best_step, best_val = metrics[cfg.eval.metric], done, metrics
                    best_state = {key: v.detach().clone() for key, v in self.model.state_dict().items()}
        if best_state is not None:
            self.model.load_state_dict(best_state)
        result = self.test.run(self.model, neighbours=False)
        return {"test": result.metrics, "val": best_val, "untrained": {"test": self.untrained, "val": self.untrained_val},
                "step": best_step or max_steps, "max_steps": max_steps,
                "images_per_s": self.batch * max_steps / self.train_s, "wall_s": time.perf_counter() - self.started}


def run_pml(cfg: Config, budget_s: float, plan: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The PML loop at the budget: measured here, or with the step count of a calibration ``plan``."""
    loop = PMLLoop(cfg)
    measured = loop.measure(budget_s)
    steps, every = (measured.max_steps, measured.eval_every) if plan is None else (plan["max_steps"], plan["eval_every"])
    out = loop.train(steps, every)
    out["budget"] = {"step_s": measured.step_s, "eval_s": measured.eval_s, "test_s": measured.test_s,
                     "planned_here": plan is None}
    return out


def run_one(system: str, name: str, root: Path, seed: int, budget: str, variants: Dict[str, List[str]],
            work: Path, selection: bool, plan: Optional[Dict[str, Any]] = None, task: str = "",
            data: Sequence[str] = ()) -> Dict[str, Any]:
    """One run; ``plan``: the step count and evaluation interval a calibration measured for this
    system and data set at ``budget`` (then the run repeats it, whatever the machine is doing now);
    ``task``, ``data``: the name and class split of a :func:`test_tasks` or :func:`rotated_tasks` task
    (the data set's own: its name and no overrides)."""
    from deepmetric.config import parse_duration

    fold = [*data, *(selection_fold(name, root, seed) if selection else [])]
    tag = task or name
    fixed = [] if plan is None else ["train.time_budget=null", f"train.max_steps={plan['max_steps']}",
                                     f"train.eval_every={plan['eval_every']}"]
    if system == "pml":  # on the recipe of the candidate it is compared with (its network, input, lr, schedule)
        return run_pml(auto_recipe(root, name, seed, budget, [*variants.get(PML_LIKE, []), *fold]),
                       parse_duration(budget), plan)
    if system == "readme":  # as a user ran it: an error it stops with is its result
        from deepmetric.core.errors import UserError

        try:
            cfg = load_config("quickstart", README_COMMAND + split_overrides(name, root)
                              + [f"data.root={root}", f"seed={seed}", "train.progress=false", *fold])
            return run_trainer(cfg, work / f"{tag}-{seed}-readme{'-sel' if selection else ''}")
        except UserError as e:
            nan = {k: float("nan") for k in SHOWN}
            return {"error": str(e), "test": nan, "val": None, "untrained": None, "step": None, "max_steps": 0}
    extra = variants.get(system, [])
    cfg = auto_recipe(root, name, seed, budget, [*extra, *fold, *fixed])
    return run_trainer(cfg, work / f"{tag}-{seed}-{system}{'-sel' if selection else ''}")


def test_tasks(name: str, root: Path, classes: int, tasks: int) -> List[Tuple[str, List[str]]]:
    """``(task name, data overrides)``: the data set itself, or with ``classes`` K, ``tasks`` few-class
    test tasks cut from it: task t trains on the t-th K of its training classes and tests on the t-th K
    of its test classes (both in :func:`hash_order`), so the test classes stay ones no choice has seen."""
    if not classes:
        return [(name, [])]
    train, test = (hash_order(c) for c in split_classes(name, root))
    if len(train) < classes * tasks or len(test) < classes * tasks:
        raise SystemExit(f"bench_suite: {name} has {len(train)} training and {len(test)} test classes, too few for "
                         f"{tasks} tasks of {classes}")
    return [(f"{name}@{classes}.{t}",
             [f"data.train_classes={json.dumps(sorted(train[t * classes:(t + 1) * classes]))}",
              f"data.test_classes={json.dumps(sorted(test[t * classes:(t + 1) * classes]))}"]) for t in range(tasks)]


def rotated_tasks(name: str, root: Path, rotations: int) -> List[Tuple[str, List[str]]]:
    """``(task name, data overrides)`` of ``rotations`` rotated zero-shot splits of data set ``name``: its
    classes in :func:`hash_order`, and task r tests on as many of them as its own split does, from
    position ``r x (classes // rotations)`` on (wrapping round), and trains on the others. For a data
    set whose fixed split tests one kind of thing against another (Fashion-MNIST: garments train,
    shoes and bags are tested), so that the judgement is not one split's."""
    train, test = split_classes(name, root)
    order = hash_order(sorted(train + test))
    n, n_test = len(order), len(test)
    step = max(1, n // rotations)
    tasks = []
    for r in range(rotations):
        tested = sorted(order[(r * step + j) % n] for j in range(n_test))
        tasks.append((f"{name}~{r}", [f"data.train_classes={json.dumps(sorted(set(order) - set(tested)))}",
                                      f"data.test_classes={json.dumps(tested)}"]))
    return tasks


def budget_clock():
    from deepmetric.engine import budget

    return budget.CLOCK


def calibrate_one(system: str, name: str, root: Path, budget: str, variants: Dict[str, List[str]], work: Path,
                  selection: bool) -> Dict[str, Any]:
    """What ``budget`` comes to for ``system`` on data set ``name``, measured now (no training)."""
    from deepmetric.config import parse_duration

    fold = selection_fold(name, root, 0) if selection else []
    like = variants.get(PML_LIKE if system == "pml" else system, [])
    cfg = auto_recipe(root, name, 0, budget, [*like, *fold])
    if system == "pml":
        plan = PMLLoop(cfg).measure(parse_duration(budget), time_test=False)
    else:
        plan, _ = measure_budget(Trainer(cfg, work / f"calibrate-{name}-{system}-{int(selection)}"), time_test=False)
    return {"max_steps": plan.max_steps, "eval_every": plan.eval_every, "step_s": plan.step_s,
            "eval_s": plan.eval_s, "test_s": plan.test_s, "elapsed_s": plan.elapsed_s}


def few_classes(name: str, root: Path) -> bool:
    from deepmetric.engine.auto import validation_rule

    n = len(split_classes(name, root)[0])
    return validation_rule(n)[0] is None


def cmd_run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:  # budgets measured in one thread's CPU time, as a calibration's (see cmd_calibrate)
        _cpu_clock()
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("deepmetric").setLevel(logging.WARNING)
    variants = {f"auto_{v[0]}": v[1:] for v in args.variants}
    systems = list(args.systems) + list(variants)
    global SCREEN, PML_LIKE
    SCREEN, PML_LIKE = args.screen, f"auto_{args.pml_like}" if args.pml_like else "auto"
    report: Dict[str, Any] = {"argv": sys.argv, "budget": args.budget, "variants": variants, "runs": []}
    if args.json and Path(args.json).is_file():  # continue an interrupted file
        report = json.loads(Path(args.json).read_text())
        if report.get("budget") != args.budget or report.get("variants", {}) != variants:
            raise SystemExit(f"bench_suite: {args.json} holds runs of another budget or variants")
    plans = json.loads(Path(args.plans).read_text()) if args.plans else None
    if plans is not None:
        if plans["budget"] != args.budget:
            raise SystemExit(f"bench_suite: {args.plans} was calibrated at {plans['budget']}, not {args.budget}")
        report["plans"] = args.plans
    done = {(r["dataset"], r["seed"], r["system"], r["kind"]) for r in report["runs"]}
    if args.classes and (args.plans or args.selection or "readme" in systems):
        raise SystemExit("bench_suite run --classes: the auto and pml systems, without --plans or --selection")
    if args.rotations and (args.classes or args.plans or args.selection or "readme" in systems):
        raise SystemExit("bench_suite run --rotations: the auto and pml systems, without --classes, --plans or "
                         "--selection")
    work = Path(tempfile.mkdtemp(prefix="bench_suite_"))
    for name in args.datasets:
        root = Path(args.root) / DATASETS[name].folder
        if not root.is_dir():
            raise SystemExit(f"bench_suite: {root} not found (see the module docstring: prepare / make_*_benchmark)")
        kinds = ["report"] + (["select"] if args.selection and few_classes(name, root) else [])
        tasks = rotated_tasks(name, root, args.rotations) if args.rotations else test_tasks(name, root, args.classes,
                                                                                             args.tasks)
        for (task, data), seed, kind, system in itertools.product(tasks, args.seeds, kinds, systems):
            if kind == "select" and system in ("readme",):
                continue
            if (task, seed, system, kind) in done:
                continue
            t0 = time.perf_counter()
            plan = None
            if plans is not None and system != "readme":
                key = f"{name}/{system}/{kind}"
                if key not in plans["plans"]:
                    raise SystemExit(f"bench_suite: {args.plans} has no plan for {key}; calibrate it")
                plan = plans["plans"][key]
            r = run_one(system, name, root, seed, args.budget, variants, work, kind == "select", plan, task, data)
            r.update(dataset=task, seed=seed, system=system, kind=kind, load=os.getloadavg(), screen=SCREEN,
                     pml_like=PML_LIKE if system == "pml" else None)
            report["runs"].append(r)
            val = (r.get("val") or {}).get("map@r")
            if r.get("error"):
                print(f"[{task} seed {seed} {kind}] {system:<16} error: {r['error']}", flush=True)
            print(f"[{task} seed {seed} {kind}] {system:<16} test map@r {r['test']['map@r']:.4f} "
                  f"R@1 {r['test']['recall@1']:.4f}  val {'-' if val is None else f'{val:.4f}'}  "
                  f"steps {r['max_steps']} (selected {r['step']})  {time.perf_counter() - t0:.0f} s",
                  flush=True)
            if args.json:
                atomic_write(args.json, json.dumps(report, indent=1, default=float))
    return 0


def _cpu_clock() -> None:
    from deepmetric.engine import budget

    if torch.get_num_threads() != 1:
        raise SystemExit("bench_suite --cpu-time needs --threads 1")
    budget.CLOCK = time.process_time


def cmd_calibrate(args) -> int:
    """Measure what the budget comes to for every system and data set, on a machine doing nothing
    else (one thread, as the runs): the runs then repeat those step counts (``run --plans``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:  # one thread's CPU time: its wall time on an idle machine, whatever else runs
        _cpu_clock()
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("deepmetric").setLevel(logging.WARNING)
    variants = {f"auto_{v[0]}": v[1:] for v in args.variants}
    global PML_LIKE
    PML_LIKE = f"auto_{args.pml_like}" if args.pml_like else "auto"
    out: Dict[str, Any] = {"argv": sys.argv, "budget": args.budget, "load_before": os.getloadavg(), "plans": {}}
    if args.json and Path(args.json).is_file():
        out = json.loads(Path(args.json).read_text())
    work = Path(tempfile.mkdtemp(prefix="bench_suite_calibrate_"))
    for name in args.datasets:
        root = Path(args.root) / DATASETS[name].folder
        kinds = ["report"] + (["select"] if args.selection and few_classes(name, root) else [])
        for kind in kinds:
            for system in [s for s in args.systems if s != "readme"] + list(variants):
                key = f"{name}/{system}/{kind}"
                if key in out["plans"]:
                    continue
                tries = [calibrate_one(system, name, root, args.budget, variants, work, kind == "select")
                         for _ in range(args.repeat)]
                plan = max(tries, key=lambda p: p["max_steps"])  # the least disturbed measurement
                plan["tries"] = [t["max_steps"] for t in tries]
                plan["load"] = os.getloadavg()
                out["plans"][key] = plan
                print(f"{key:<40} {plan['max_steps']:>6} steps, an evaluation every {plan['eval_every']:>5} "
                      f"({plan['step_s'] * 1000:.0f} ms a step, evaluation {plan['eval_s']:.1f} s, test "
                      f"{plan['test_s']:.1f} s)", flush=True)
                if args.json:
                    atomic_write(args.json, json.dumps(out, indent=1))
    return 0


# -- the few-class rule's validation curves ---------------------------------------------------------------

def curve_tasks(args):
    """``(dataset, task name, data overrides, fold -> validation overrides)`` of each curve task. A
    few-class data set is one task, its folds :func:`selection_fold`. With ``--classes K``, a
    many-class data set gives ``--tasks`` few-class tasks: K of its training classes each (consecutive
    slices of their hash order), folded as the automatic recipe folds them
    (:func:`deepmetric.engine.auto.fold_classes`), and two other training classes as a token test split."""
    from deepmetric.engine.auto import fold_classes

    for name in args.datasets:
        root = Path(args.root) / DATASETS[name].folder
        if not args.classes or few_classes(name, root):
            yield name, name, [], lambda f, name=name, root=root: selection_fold(name, root, f)
            continue
        train = hash_order(split_classes(name, root)[0])
        k = args.classes
        for t in range(args.tasks):
            subset = train[t * k:(t + 1) * k]
            test = train[(t + 1) * k:(t + 1) * k + 2]
            folds = fold_classes(subset, args.folds)
            data = [f"data.train_classes={json.dumps(sorted(subset))}", f"data.test_classes={json.dumps(test)}"]
            yield name, f"{name}@{k}.{t}", data, lambda f, folds=folds: [f"data.val_classes={json.dumps(folds[f])}"]


def fold_session(args, prefix: str) -> Tuple[Dict[str, Any], Path]:
    """What a command over :func:`curve_tasks` starts from: ``--threads`` threads, the library's
    warnings and info lines off, the results so far (``--json``, resumed where it exists) and a
    fresh work folder named ``prefix...``."""
    import logging

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("deepmetric").setLevel(logging.WARNING)
    out = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    return out, Path(tempfile.mkdtemp(prefix=prefix))


def cmd_curves(args) -> int:
    """Validation curves of the default on a few-class data set's folds (two held-out training classes
    each, :func:`selection_fold`), for the whole run, evaluated every ``--every`` steps; then each fold
    scored at the length the other folds' mean curve chooses (:mod:`deepmetric.engine.folds`, cross-
    validated) against its last step and its untrained network. ``--pooled-json``: every validation
    also scores the pooled features under the projection (``train.fold_retrieval``), written there
    in the same form, so that ``choose embedding=JSON pooled=POOLED_JSON`` compares the two."""
    from deepmetric.engine.folds import choose_length, mean_curve, validation_curve

    out, work = fold_session(args, "bench_suite_curves_")
    pooled = json.loads(Path(args.pooled_json).read_text()) if args.pooled_json and Path(args.pooled_json).is_file() else {}
    for name, task, data, fold_of in curve_tasks(args):
        root = Path(args.root) / DATASETS[name].folder
        for f in range(args.folds):
            key = f"{task}/{f}"
            if key not in out or (args.pooled_json and key not in pooled):
                cfg = auto_recipe(root, name, 0, "2m", [*fold_of(f), *data, "train.time_budget=null",
                                                         f"train.max_steps={args.steps[name]}",
                                                         f"train.eval_every={args.every[name]}", *args.set])
                trainer = Trainer(cfg, work / key.replace("/", "-"))
                if args.pooled_json:
                    trainer.pooled_curve = {}
                trainer.fit()
                out[key] = validation_curve(trainer, "map@r")
                if args.json:
                    atomic_write(args.json, json.dumps(out))
                if args.pooled_json:
                    pooled[key] = sorted(trainer.pooled_curve.items())
                    atomic_write(args.pooled_json, json.dumps(pooled))
        curves = [dict(map(tuple, out[f"{task}/{f}"])) for f in range(args.folds)]
        rows = []
        for j, c in enumerate(curves):
            step = choose_length(mean_curve([list(o.items()) for i, o in enumerate(curves) if i != j]))
            rows.append((c[0], c[max(c)], c[step]))
            print(f"{task} fold {j}: untrained {c[0]:.4f}, last step {c[max(c)]:.4f}, the other folds' length "
                  f"(step {step}) {c[step]:.4f}")
        u, last, chosen = (statistics.fmean(col) for col in zip(*rows))
        print(f"{task}: untrained {u:.4f}, last step {last:.4f}, length chosen by the other folds {chosen:.4f}")
    return 0


def cmd_choose(args) -> int:
    """``train.fold_candidates``, cross-validated on ``curves`` files: for every task that each
    candidate's files hold, each held-out fold is scored at the candidate and step that the other
    folds' mean curves choose (the best candidate's best step; the first candidate of equals), every
    curve first cut to ``--share`` of its length (the share of the budget the folds get with more
    candidates; ``--margin-se``: ``train.fold_margin_se``). Also each candidate alone, cross-validated
    the same way."""
    from deepmetric.engine.folds import choose_candidate, choose_length, mean_curve

    files: Dict[str, Dict[str, Any]] = {}
    for item in args.candidates:
        name, _, paths = item.partition("=")
        files[name] = {}
        for path in paths.split(","):
            files[name].update(json.loads(Path(path).read_text()))
    names = list(files)
    tasks = sorted({k.rsplit("/", 1)[0] for k in files[names[0]]})
    for task in tasks:
        curves = {}
        for name in names:
            folds = sorted(int(k.rsplit("/", 1)[1]) for k in files[name] if k.rsplit("/", 1)[0] == task)
            if not folds:
                break
            cut = []
            for f in folds:
                c = [tuple(p) for p in files[name][f"{task}/{f}"]]
                last = c[-1][0] * args.share
                cut.append([p for p in c if p[0] <= last + 1e-9])
            curves[name] = cut
        if len(curves) < len(names):
            continue
        k = len(curves[names[0]])
        alone = {n: [] for n in names}
        chosen, picks = [], []
        for h in range(k):
            steps, inner = [], []
            for n in names:
                others = [c for i, c in enumerate(curves[n]) if i != h]
                step = choose_length(mean_curve(others))
                alone[n].append(dict(curves[n][h])[step])
                steps.append(step)
                inner.append([dict(c)[step] for c in others])
            j = choose_candidate(inner, args.margin_se)[0]
            chosen.append(dict(curves[names[j]][h])[steps[j]])
            picks.append(f"{names[j]}@{steps[j]}")
        untrained = statistics.fmean(c[0][1] for c in curves[names[0]])
        cells = "  ".join(f"{n} {statistics.fmean(v):.4f}" for n, v in alone.items())
        print(f"{task}: untrained {untrained:.4f}  {cells}  the folds choose {statistics.fmean(chosen):.4f} "
              f"({', '.join(picks)})")
    return 0


# -- the table -----------------------------------------------------------------------------------------

def load_runs(paths: Sequence[str]) -> List[Dict[str, Any]]:
    runs, budgets = [], set()
    for p in paths:
        data = json.loads(Path(p).read_text())
        budgets.add(data["budget"])
        runs += data["runs"]
    if len(budgets) > 1:
        raise SystemExit(f"bench_suite table: the files were run at different budgets {sorted(budgets)}")
    return runs


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def validation_scores(runs, datasets, candidates) -> Dict[str, Dict[str, float]]:
    """``{dataset: {candidate: mean validation MAP@R}}``: report runs where they validate, else the
    selection runs (few training classes)."""
    out: Dict[str, Dict[str, float]] = {}
    for d in datasets:
        out[d] = {}
        for c in candidates:
            mine = [r for r in runs if r["dataset"] == d and r["system"] == c]
            kind = "report" if any(r["kind"] == "report" and r.get("val") for r in mine) else "select"
            out[d][c] = _mean([(r.get("val") or {}).get("map@r") for r in mine if r["kind"] == kind])
    return out


def choose(scores: Dict[str, Dict[str, float]], datasets: Sequence[str], candidates: Sequence[str]) -> str:
    """The candidate with the best mean rank of validation MAP@R over ``datasets`` (ties: mean score)."""
    ranks = {c: [] for c in candidates}
    for d in datasets:
        key = {c: -scores[d][c] if scores[d][c] == scores[d][c] else 1e9 for c in candidates}
        for c in candidates:  # candidates with equal scores (the same recipe there) share their mean rank
            below, equal = sum(key[o] < key[c] for o in candidates), sum(key[o] == key[c] for o in candidates)
            ranks[c].append(below + (equal - 1) / 2)
    return min(candidates, key=lambda c: (statistics.fmean(ranks[c]), -_mean([scores[d][c] for d in datasets])))


def untrained_network(runs: Sequence[Dict[str, Any]], run: Dict[str, Any]) -> Dict[str, float]:
    """The test metrics of *one* untrained network of ``run``'s recipe: the PML loop's step 0 on the same
    data set, seed and kind (the same backbone, one network, its embedding), else ``run``'s own step 0.
    An auto run of several networks has its own step 0 of several (and of what it retrieves): a
    stricter reference the docs give beside this one."""
    for r in runs:
        if (r["system"] == "pml" and r["dataset"] == run["dataset"] and r["seed"] == run["seed"]
                and r["kind"] == run["kind"] and r.get("untrained")):
            return r["untrained"]["test"]
    return run["untrained"]["test"]


def cmd_table(args) -> int:
    runs = load_runs(args.files)
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in runs)]
    candidates = sorted({r["system"] for r in runs if r["system"].startswith("auto")})
    scores = validation_scores(runs, datasets, candidates)
    print("validation MAP@R (mean over seeds) of each candidate default:")
    print(f"{'candidate':<22}" + "".join(f"{d:>11}" for d in datasets))
    for c in candidates:
        print(f"{c:<22}" + "".join(f"{scores[d][c]:>11.4f}" for d in datasets))

    def test(d, system, key="map@r"):
        rs = [r for r in runs if r["dataset"] == d and r["system"] == system and r["kind"] == "report"
              and not r.get("screen")]
        return _mean([r["test"][key] for r in rs]), len(rs)

    print("\nleave-one-data-set-out: defaults chosen on the other data sets' validation, scored on this test split")
    head = f"{'data set':<11}{'chosen':<18}" + "".join(f"{s + ' ' + k:>19}" for s in ("untrained", "auto", "pml", "readme")
                                                        for k in ("R@1", "MAP@R")) + f"{'auto-pml':>10}{'seeds':>7}"
    print(head)
    ok, notes, runs_all, runs_above, runs_below = True, [], 0, 0, 0
    for d in datasets:
        others = [o for o in datasets if o != d]
        chosen = choose(scores, others, candidates) if others else candidates[0]
        rs = [r for r in runs if r["dataset"] == d and r["system"] == chosen and r["kind"] == "report"
              and not r.get("screen")]
        pairs = [(r, untrained_network(runs, r)) for r in rs]
        un = {k: _mean([u[k] for _, u in pairs]) for k in METRICS}
        cells = [un["recall@1"], un["map@r"]]
        for system in (chosen, "pml", "readme"):
            cells += [test(d, system, "recall@1")[0], test(d, system)[0]]
        gap = cells[3] - cells[5]
        beats_untrained = all(_mean([r["test"][k] for r in rs]) > un[k] for k in METRICS)
        ok &= gap >= 0.02 and beats_untrained
        print(f"{d:<11}{chosen:<18}" + "".join(f"{c:>19.4f}" for c in cells) + f"{gap:>+10.4f}{len(rs):>7}"
              + ("" if gap >= 0.02 and beats_untrained else "   <- short"))
        several = [r for r in rs if (r.get("members") or 1) > 1]
        if several:  # the stricter reference: the run's own step 0, all its networks
            own = {k: _mean([r["untrained"]["test"][k] for r in several]) for k in METRICS}
            short = [k for k in METRICS if not _mean([r["test"][k] for r in several]) > own[k]]
            print(f"{'':<11}its own step 0 ({'/'.join(sorted({str(r['members']) for r in several}))} networks): "
                  f"R@1 {own['recall@1']:.4f}, MAP@R {own['map@r']:.4f}; the mean above it on "
                  + (f"every metric but {', '.join(short)}" if short else "every metric"))
        for r, u in pairs:
            runs_all += 1
            not_above = [(k, "equal" if r["test"][k] == u[k] else "below") for k in METRICS if not r["test"][k] > u[k]]
            runs_above += not not_above
            runs_below += any(how == "below" for _, how in not_above)
            notes += [f"{d} seed {r['seed']}: {k} {how} ({r['test'][k]:.4f} vs {u[k]:.4f})" for k, how in not_above]
    print(f"\ntarget (>= +0.02 MAP@R over the PML loop and, on the mean over seeds, above the untrained network on "
          f"every metric, every rotation): {'met' if ok else 'NOT met'}")
    print(f"run by run: above the untrained network on every metric on {runs_above} of {runs_all}, below it on "
          f"some metric on {runs_below}" + "".join(f"\n  {n}" for n in notes))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the folders of the array data sets")
    p.add_argument("--out", default="/tmp/suite")
    r = sub.add_parser("run", help="train the systems on data sets of the suite")
    r.add_argument("--root", default="/tmp/suite")
    r.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    r.add_argument("--systems", nargs="*", default=["auto", "pml", "readme"], choices=["auto", "pml", "readme"])
    r.add_argument("--variant", dest="variants", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE")
    r.add_argument("--budget", default="2m")
    r.add_argument("--selection", action="store_true", help="also selection runs where the training classes are few")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--json")
    r.add_argument("--plans", help="a calibration's --json: repeat its step counts instead of measuring")
    r.add_argument("--pml-like", help="the candidate (a --variant NAME) whose recipe the PML loop runs on")
    r.add_argument("--cpu-time", action="store_true",
                   help="without --plans: measure the budget in the process's CPU time (one thread), as calibrate")
    r.add_argument("--screen", action="store_true",
                   help=f"score only {SCREEN_TEST_CLASSES} test classes (candidates compared on validation)")
    r.add_argument("--classes", type=int, default=0,
                   help="few-class test tasks of this many training and test classes each (test_tasks)")
    r.add_argument("--tasks", type=int, default=3, help="with --classes: this many tasks per data set")
    r.add_argument("--rotations", type=int, default=0,
                   help="judge each data set on this many rotated zero-shot splits of its classes (rotated_tasks)")
    c = sub.add_parser("calibrate", help="measure what the budget comes to, per data set and system")
    c.add_argument("--root", default="/tmp/suite")
    c.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    c.add_argument("--systems", nargs="*", default=["auto", "pml"], choices=["auto", "pml"])
    c.add_argument("--variant", dest="variants", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE")
    c.add_argument("--budget", default="2m")
    c.add_argument("--selection", action="store_true")
    c.add_argument("--repeat", type=int, default=2, help="measure this many times and keep the fastest")
    c.add_argument("--pml-like", help="the candidate (a --variant NAME) whose recipe the PML loop runs on")
    c.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU time (one thread): an idle machine's wall time, on a busy one")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--json")
    v = sub.add_parser("curves", help="validation curves of the few-class rule on held-out folds")
    v.add_argument("--root", default="/tmp/suite")
    v.add_argument("--datasets", nargs="+", default=["digits", "fashion"], choices=list(DATASETS))
    v.add_argument("--steps", type=lambda t: dict(item.split("=") for item in t.split(",")),
                   default="digits=10580,fashion=3413", help="NAME=STEPS,...: each run's length")
    v.add_argument("--every", type=lambda t: dict(item.split("=") for item in t.split(",")),
                   default="digits=100,fashion=100", help="NAME=STEPS,...: evaluate every STEPS steps")
    v.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="a candidate: overrides of the default")
    v.add_argument("--folds", type=int, default=3)
    v.add_argument("--classes", type=int, default=0,
                   help="few-class tasks of this many training classes from the many-class data sets")
    v.add_argument("--tasks", type=int, default=3, help="with --classes: this many tasks per data set")
    v.add_argument("--threads", type=int, default=1)
    v.add_argument("--json")
    v.add_argument("--pooled-json", help="also the pooled features' curves (train.fold_retrieval), in this file")
    h = sub.add_parser("choose", help="the folds' choice between candidates, cross-validated, from curves files")
    h.add_argument("candidates", nargs="+", metavar="NAME=FILE[,FILE...]", help="each candidate's curves files")
    h.add_argument("--share", type=float, default=1.0, help="cut every curve to this fraction of its length")
    h.add_argument("--margin-se", type=float, default=0.0,
                   help="a later candidate must beat the first by this many standard errors (train.fold_margin_se)")
    t = sub.add_parser("table", help="leave-one-data-set-out table of --json files")
    t.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.out))
        return 0
    return {"run": cmd_run, "calibrate": cmd_calibrate, "curves": cmd_curves, "choose": cmd_choose,
            "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
