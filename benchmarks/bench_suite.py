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

Model selection follows the automatic recipe's rule (a validation split of the training classes; the
last step when they are few, :func:`deepmetric.engine.auto.validation_rule`). Choosing defaults
needs a validation score on every data set, so a data set with few training classes also gets
*selection runs* (``--selection``): its training classes less a rotating fold of two, which
validate. ``table`` then does leave-one-data-set-out: for each data set, the candidate with the best
mean rank of validation MAP@R on the *other* data sets, scored on this one's test split beside the
PML loop, the untrained network and the README command.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepmetric.config import Config, load_config  # noqa: E402
from deepmetric.core.files import atomic_write  # noqa: E402
from deepmetric.engine.auto import auto_config, hash_order  # noqa: E402
from deepmetric.engine.budget import plan_steps  # noqa: E402
from deepmetric.engine.build import build_data, build_model, seed_everything  # noqa: E402
from deepmetric.engine.evaluator import Evaluator  # noqa: E402
from deepmetric.engine.schedule import LRSchedule  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402

SHOWN = ("recall@1", "map@r", "map", "r_precision")


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
                         what="Fashion-MNIST: garments train (the training file), shoes, shirts and bags are tested "
                              "(the test file)"),
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


def split_overrides(name: str, root: Path) -> List[str]:
    """``data.train_classes`` / ``data.test_classes`` of data set ``name`` in folder ``root``."""
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
    return [f"data.train_classes={json.dumps(train)}", f"data.test_classes={json.dumps(test)}"]


def selection_fold(name: str, root: Path, seed: int) -> List[str]:
    """A rotating validation fold of two training classes, for data sets whose training classes are
    too few for the automatic recipe to validate on (their candidates still need a validation score)."""
    train = json.loads(split_overrides(name, root)[0].split("=", 1)[1])
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
    for part, classes in (("train", range(5)), ("t10k", range(5, 10))):
        images = read_idx(_idx(base, f"{part}-images-idx3-ubyte"))
        labels = read_idx(_idx(base, f"{part}-labels-idx1-ubyte"))
        for c in classes:
            folder = out / "fashion" / FASHION_NAMES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == c):
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
            "images_per_s": statistics.fmean(r["images_per_s"] for r in logs) if logs else None, "wall_s": wall}


def run_trainer(cfg: Config, run_dir: Path) -> Dict[str, Any]:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    summary = trainer.fit()
    return _summary_record(trainer, summary, time.perf_counter() - t0)


def run_pml(cfg: Config, budget_s: float) -> Dict[str, Any]:
    """The PML loop (see the module docstring) at the same budget: the untrained evaluations and ten
    steps timed, :func:`plan_steps` for the step count, the same selection."""
    from bench_fidelity import pml_recipe
    from pytorch_metric_learning.samplers import MPerClassSampler
    from torch.utils.data import DataLoader

    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"transform": "tensor"})})  # no augmentation
    seed_everything(cfg.seed)  # MPerClassSampler draws from numpy's global generator
    started = time.perf_counter()
    splits = build_data(cfg)
    model = build_model(cfg)
    loss_fn, miner = pml_recipe("pml_ms")  # MultiSimilarityLoss + MultiSimilarityMiner, PML's defaults
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    d = cfg.data
    batch = d.classes_per_batch * d.samples_per_class
    val = Evaluator(cfg, splits.val) if splits.val is not None else None
    test = Evaluator(cfg, splits)
    t0 = time.perf_counter()
    untrained_val = val.evaluate(model) if val is not None else None
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    untrained = test.run(model, neighbours=False).metrics
    test_s = time.perf_counter() - t0
    sampler = MPerClassSampler(splits.train.labels, m=d.samples_per_class, batch_size=batch,
                               length_before_new_iter=batch * 500)

    def batches():
        while True:  # MPerClassSampler draws a new plan of 500 batches each pass
            yield from DataLoader(splits.train, batch_size=batch, sampler=sampler, drop_last=True, num_workers=0)

    loader = batches()
    schedule = LRSchedule(cfg.scheduler, [opt], 10 ** 9)  # the warm-up does not depend on the length

    def step(k: int) -> None:
        images, labels, _ = next(loader)
        schedule.apply(k)
        emb = model(images)
        loss = loss_fn(emb, labels, miner(emb, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    timed = []
    for k in range(12):  # the first steps of the run itself, timed (they are in the warm-up)
        t0 = time.perf_counter()
        step(k)
        timed.append(time.perf_counter() - t0)
    plan = plan_steps(budget_s, time.perf_counter() - started, float(np.median(timed[2:])),
                      eval_s if val is not None else test_s, test_s)
    schedule = LRSchedule(cfg.scheduler, [opt], plan.max_steps)
    best, best_step, best_state, best_val = None, None, None, None
    train_s = sum(timed)
    for k in range(12, plan.max_steps):
        t0 = time.perf_counter()
        step(k)
        train_s += time.perf_counter() - t0
        done = k + 1
        if val is not None and (done % plan.eval_every == 0 or done == plan.max_steps):
            metrics = val.evaluate(model)
            model.train()
            if best is None or metrics[cfg.eval.metric] > best:
                best, best_step, best_val = metrics[cfg.eval.metric], done, metrics
                best_state = {key: v.detach().clone() for key, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    result = test.run(model, neighbours=False)
    return {"test": result.metrics, "val": best_val, "untrained": {"test": untrained, "val": untrained_val},
            "step": best_step or plan.max_steps, "max_steps": plan.max_steps,
            "budget": {"step_s": plan.step_s, "eval_s": plan.eval_s, "test_s": plan.test_s},
            "images_per_s": batch * plan.max_steps / train_s, "wall_s": time.perf_counter() - started}


def run_one(system: str, name: str, root: Path, seed: int, budget: str, variants: Dict[str, List[str]],
            work: Path, selection: bool) -> Dict[str, Any]:
    from deepmetric.config import parse_duration

    fold = selection_fold(name, root, seed) if selection else []
    if system == "pml":
        return run_pml(auto_recipe(root, name, seed, budget, fold), parse_duration(budget))
    if system == "readme":  # as a user ran it: an error it stops with is its result
        from deepmetric.core.errors import UserError

        try:
            cfg = load_config("quickstart", README_COMMAND + split_overrides(name, root)
                              + [f"data.root={root}", f"seed={seed}", "train.progress=false", *fold])
            return run_trainer(cfg, work / f"{name}-{seed}-readme{'-sel' if selection else ''}")
        except UserError as e:
            nan = {k: float("nan") for k in SHOWN}
            return {"error": str(e), "test": nan, "val": None, "untrained": None, "step": None, "max_steps": 0}
    extra = variants.get(system, [])
    cfg = auto_recipe(root, name, seed, budget, [*extra, *fold])
    return run_trainer(cfg, work / f"{name}-{seed}-{system}{'-sel' if selection else ''}")


def few_classes(name: str, root: Path) -> bool:
    from deepmetric.engine.auto import validation_rule

    n = len(json.loads(split_overrides(name, root)[0].split("=", 1)[1]))
    return validation_rule(n)[0] is None


def cmd_run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("deepmetric").setLevel(logging.WARNING)
    variants = {f"auto_{v[0]}": v[1:] for v in args.variants}
    systems = list(args.systems) + list(variants)
    report: Dict[str, Any] = {"argv": sys.argv, "budget": args.budget, "variants": variants, "runs": []}
    if args.json and Path(args.json).is_file():  # continue an interrupted file
        report = json.loads(Path(args.json).read_text())
        if report.get("budget") != args.budget or report.get("variants", {}) != variants:
            raise SystemExit(f"bench_suite: {args.json} holds runs of another budget or variants")
    done = {(r["dataset"], r["seed"], r["system"], r["kind"]) for r in report["runs"]}
    work = Path(tempfile.mkdtemp(prefix="bench_suite_"))
    for name in args.datasets:
        root = Path(args.root) / DATASETS[name].folder
        if not root.is_dir():
            raise SystemExit(f"bench_suite: {root} not found (see the module docstring: prepare / make_*_benchmark)")
        kinds = ["report"] + (["select"] if args.selection and few_classes(name, root) else [])
        for seed in args.seeds:
            for kind in kinds:
                for system in systems:
                    if kind == "select" and system in ("readme",):
                        continue
                    if (name, seed, system, kind) in done:
                        continue
                    t0 = time.perf_counter()
                    r = run_one(system, name, root, seed, args.budget, variants, work, kind == "select")
                    r.update(dataset=name, seed=seed, system=system, kind=kind, load=os.getloadavg())
                    report["runs"].append(r)
                    val = (r.get("val") or {}).get("map@r")
                    if r.get("error"):
                        print(f"[{name} seed {seed} {kind}] {system:<16} error: {r['error']}", flush=True)
                    print(f"[{name} seed {seed} {kind}] {system:<16} test map@r {r['test']['map@r']:.4f} "
                          f"R@1 {r['test']['recall@1']:.4f}  val {'-' if val is None else f'{val:.4f}'}  "
                          f"steps {r['max_steps']} (selected {r['step']})  {time.perf_counter() - t0:.0f} s",
                          flush=True)
                    if args.json:
                        atomic_write(args.json, json.dumps(report, indent=1, default=float))
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
        order = sorted(candidates, key=lambda c: -scores[d][c] if scores[d][c] == scores[d][c] else 1e9)
        for i, c in enumerate(order):
            ranks[c].append(i)
    return min(candidates, key=lambda c: (statistics.fmean(ranks[c]), -_mean([scores[d][c] for d in datasets])))


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
        rs = [r for r in runs if r["dataset"] == d and r["system"] == system and r["kind"] == "report"]
        return _mean([r["test"][key] for r in rs]), len(rs)

    print("\nleave-one-data-set-out: defaults chosen on the other data sets' validation, scored on this test split")
    head = f"{'data set':<11}{'chosen':<18}" + "".join(f"{s + ' ' + k:>19}" for s in ("untrained", "auto", "pml", "readme")
                                                        for k in ("R@1", "MAP@R")) + f"{'auto-pml':>10}{'seeds':>7}"
    print(head)
    ok = True
    for d in datasets:
        others = [o for o in datasets if o != d]
        chosen = choose(scores, others, candidates) if others else candidates[0]
        rs = [r for r in runs if r["dataset"] == d and r["system"] == chosen and r["kind"] == "report"]
        un = {k: _mean([r["untrained"]["test"][k] for r in rs]) for k in SHOWN}
        cells = [un["recall@1"], un["map@r"]]
        for system in (chosen, "pml", "readme"):
            cells += [test(d, system, "recall@1")[0], test(d, system)[0]]
        gap = cells[3] - cells[5]
        beats_untrained = all(_mean([r["test"][k] for r in rs]) > un[k] for k in SHOWN)
        ok &= gap >= 0.02 and beats_untrained
        print(f"{d:<11}{chosen:<18}" + "".join(f"{c:>19.4f}" for c in cells) + f"{gap:>+10.4f}{len(rs):>7}"
              + ("" if gap >= 0.02 and beats_untrained else "   <- short"))
    print(f"\ntarget (>= +0.02 MAP@R over the PML loop and above the untrained network on every metric, every "
          f"rotation): {'met' if ok else 'NOT met'}")
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
    t = sub.add_parser("table", help="leave-one-data-set-out table of --json files")
    t.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.out))
        return 0
    return cmd_run(args) if args.command == "run" else cmd_table(args)


if __name__ == "__main__":
    raise SystemExit(main())
