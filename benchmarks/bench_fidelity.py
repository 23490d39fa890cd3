"""Real-data fidelity benchmark: deepmetric's recipe against pytorch-metric-learning (PML) loops.

Run by hand, not a test (about an hour on a 2-core CPU for the whole table):

    python benchmarks/make_glyph_benchmark.py --out /tmp/cjk_glyphs     # once: the CJK image folder
    python benchmarks/bench_fidelity.py --cjk-root /tmp/cjk_glyphs --json /tmp/fidelity.json

On each dataset (zero-shot: train classes, a class-disjoint validation split carved from them, unseen
test classes queried leave-one-out), in one process and at one budget, the same for every system
(steps x batch, optimizer, schedule, augmentation, backbone, embedding size: every key of the
dataset's recipe in ``benchmarks/fidelity/`` except ``losses``):

- ``untrained``: the network before any step (the same initialisation for every system of a seed);
- ``deepmetric``: ``deepmetric.Trainer(cfg, run_dir).fit()`` on the recipe, the product's own path;
- ``pml_ms``: a plain PyTorch loop with PML's ``MultiSimilarityLoss`` + ``MultiSimilarityMiner``
  (PML's recommended recipe) and PML's ``MPerClassSampler`` (seeded through numpy's global generator,
  which it draws from);
- ``pml_triplet``: the same loop with ``TripletMarginLoss`` + semi-hard ``TripletMarginMiner``, as
  PML's MNIST example (margin 0.2 for both, cosine similarity, ``ThresholdReducer(low=0)``).

Every system evaluates the validation split at the same steps (``train.eval_every`` and the last),
keeps the best on ``eval.metric``, and is scored once on the test split with the selected weights,
by deepmetric's evaluator. PML's ``AccuracyCalculator`` recomputes P@1, MAP@R and R-precision (and
full mAP where the test set is small enough for ``k=None``) on every system's final test embeddings;
differences from ours are reported. Throughput is training images per second (data loading, forward,
backward, step; evaluation excluded), measured for every system in the same run.

Prints one table per dataset (mean ± std over the seeds) and, with ``--json``, writes every number.
On two cores, run seeds in two processes (``--seeds 0 1`` and ``--seeds 2``, one thread each, each
with its own ``--json``), then ``--merge a.json b.json`` prints the table of all of them, with
deepmetric's recipe chosen on the validation mean over every seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepmetric.config import Config, load_config  # noqa: E402
from deepmetric.core.files import atomic_write  # noqa: E402
from deepmetric.engine.build import build_data, build_model, seed_everything  # noqa: E402
from deepmetric.engine.evaluator import Evaluator  # noqa: E402
from deepmetric.engine.schedule import LRSchedule  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPES = {
    "fashion_mnist": HERE / "fidelity" / "fashion_mnist.yaml",
    "cjk_glyphs": HERE / "fidelity" / "cjk_glyphs.yaml",
}
SYSTEMS = ("deepmetric", "pml_ms", "pml_triplet")
SHOWN = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "map", "r_precision")


# -- the systems -------------------------------------------------------------------------------------

def run_deepmetric(cfg: Config, run_dir: Path) -> Dict[str, Any]:
    """The product's path: a recipe through ``Trainer(cfg, run_dir).fit()``."""
    trainer = Trainer(cfg, run_dir)
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    logs = [r for r in trainer.history if "loss" in r]
    batch = cfg.data.classes_per_batch * cfg.data.samples_per_class
    train_s = sum(_window_steps(logs, i, cfg.train.log_every) * batch / r["images_per_s"] for i, r in enumerate(logs))
    query = trainer.last_result.query
    curve = [(r["step"], r["eval"].get(cfg.eval.metric)) for r in trainer.history if r.get("split") == "val"]
    return {"test": summary["metrics"], "val": summary["val"], "untrained": summary["untrained"],
            "step": summary["step"], "train_s": train_s, "val_curve": curve, "images": cfg.train.max_steps * batch,
            "wall_s": wall, "embeddings": query.vectors, "labels": np.asarray(query.labels)}


def _window_steps(logs: List[dict], i: int, log_every: int) -> int:
    previous = logs[i - 1]["step"] if i else 0
    return logs[i]["step"] - previous


def pml_recipe(name: str):
    """``(loss, miner)`` of PML for a plain-loop system."""
    from pytorch_metric_learning import distances, losses, miners, reducers

    if name == "pml_ms":  # PML's recommended pairing, with its default hyperparameters
        return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    if name == "pml_triplet":  # PML's MNIST example (examples/notebooks/TripletMarginLossMNIST)
        dist = distances.CosineSimilarity()
        return (losses.TripletMarginLoss(margin=0.2, distance=dist, reducer=reducers.ThresholdReducer(low=0)),
                miners.TripletMarginMiner(margin=0.2, distance=dist, type_of_triplets="semihard"))
    raise ValueError(name)


def run_pml_loop(cfg: Config, name: str) -> Dict[str, Any]:
    """A plain PyTorch training loop with PML's loss, miner and ``MPerClassSampler``, on the same
    data (the recipe's splits and augmentation), network, optimizer and learning-rate schedule."""
    from pytorch_metric_learning.samplers import MPerClassSampler
    from torch.utils.data import DataLoader

    seed_everything(cfg.seed)  # MPerClassSampler draws from numpy's global generator
    splits = build_data(cfg)
    model = build_model(cfg)
    loss_fn, miner = pml_recipe(name)
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    schedule = LRSchedule(cfg.scheduler, [opt], cfg.train.max_steps)
    d, t = cfg.data, cfg.train
    batch = d.classes_per_batch * d.samples_per_class
    sampler = MPerClassSampler(splits.train.labels, m=d.samples_per_class, batch_size=batch,
                               length_before_new_iter=t.max_steps * batch)
    loader = DataLoader(splits.train, batch_size=batch, sampler=sampler, drop_last=True, num_workers=0)
    val, test = Evaluator(cfg, splits.val), Evaluator(cfg, splits)
    best, best_step, best_state, best_val, curve = None, None, None, None, []
    train_s, step = 0.0, 0
    t0 = wall0 = time.perf_counter()
    model.train()
    for images, labels, _ in loader:
        schedule.apply(step)
        emb = model(images)
        loss = loss_fn(emb, labels, miner(emb, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % t.eval_every == 0 or step == t.max_steps:
            train_s += time.perf_counter() - t0
            metrics = val.evaluate(model)
            curve.append((step, metrics[cfg.eval.metric]))
            model.train()
            if best is None or metrics[cfg.eval.metric] > best:
                best, best_step, best_val = metrics[cfg.eval.metric], step, metrics
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            t0 = time.perf_counter()
        if step == t.max_steps:
            break
    model.load_state_dict(best_state)
    result = test.run(model, neighbours=False)
    return {"test": result.metrics, "val": best_val, "step": best_step, "train_s": train_s, "val_curve": curve,
            "images": step * batch, "wall_s": time.perf_counter() - wall0,
            "embeddings": result.query.vectors, "labels": np.asarray(result.query.labels)}


# -- the cross-check ---------------------------------------------------------------------------------

def pml_accuracy(embeddings: torch.Tensor, labels: np.ndarray, full_map_limit: int) -> Dict[str, float]:
    """PML ``AccuracyCalculator`` on leave-one-out embeddings, keyed by our metric names. ``k=None``
    (full mAP too) only up to ``full_map_limit`` queries: it holds a dense N x N label matrix."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    include = ["precision_at_1", "mean_average_precision_at_r", "r_precision"]
    small = len(labels) <= full_map_limit
    if small:
        include.append("mean_average_precision")
    calc = AccuracyCalculator(include=tuple(include), k=None if small else "max_bin_count", device=torch.device("cpu"))
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    acc = calc.get_accuracy(x, torch.as_tensor(labels))
    names = {"precision_at_1": "recall@1", "mean_average_precision_at_r": "map@r", "r_precision": "r_precision",
             "mean_average_precision": "map"}
    return {names[k]: float(v) for k, v in acc.items()}


def cross_check(ours: Dict[str, Any], theirs: Dict[str, float]) -> Dict[str, float]:
    return {k: float(ours[k]) - v for k, v in theirs.items()}


# -- the table ---------------------------------------------------------------------------------------

def mean_std(values: List[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(dataset: str, rows: Dict[str, List[Dict[str, Any]]]) -> str:
    head = f"{'system':<14}" + "".join(f"{k:>17}" for k in SHOWN) + f"{'images/s':>12}{'step':>7}{'seeds':>7}"
    out = [f"== {dataset} (mean ± std over the seeds; test split, selected on validation)", head]
    for system, runs in rows.items():
        cells = []
        for k in SHOWN:
            m, s = mean_std([r["test"].get(k) for r in runs])
            cells.append(f"{m:>10.4f} ±{s:.4f}")
        ips = [r["images"] / r["train_s"] for r in runs if r.get("train_s")]
        steps = [r["step"] for r in runs if r.get("step") is not None]
        out.append(f"{system:<14}" + "".join(f"{c:>17}" for c in cells)
                   + (f"{statistics.fmean(ips):>12.0f}" if ips else f"{'-':>12}")
                   + (f"{statistics.fmean(steps):>7.0f}" if steps else f"{'-':>7}") + f"{len(runs):>7}")
    return "\n".join(out)


def choose_on_validation(rows: Dict[str, List[Dict[str, Any]]], candidates: List[str], metric: str):
    """The deepmetric recipe with the best mean validation ``metric`` of its selected checkpoints
    (the test split plays no part), and every candidate's mean; only candidates run on the most
    seeds compete (a mean over fewer seeds is not comparable)."""
    most = max((len(rows[c]) for c in candidates), default=0)
    means = {c: mean_std([r["val"][metric] for r in rows[c]])[0] for c in candidates if rows[c] and len(rows[c]) == most}
    return max(means, key=means.get), means


def merge_reports(paths: List[str]) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
    """``{dataset: {system: [run, ...]}}`` over the ``--json`` files of several processes, runs in
    file order. One budget per dataset, and one set of overrides per variant name: a table never
    mixes two recipes under one name."""
    merged: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    budgets: Dict[str, Any] = {}
    variants: Dict[str, Any] = {}
    recipes: Dict[str, Any] = {}  # the losses "deepmetric" ran with: the recipe file may have changed since
    for path in paths:
        try:
            datasets = json.loads(Path(path).read_text())["datasets"]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"bench_fidelity: --merge {path}: not a report of this script ({e})")
        for dataset, part in datasets.items():
            key = (part.get("budget"), part.get("recipe_overrides"))
            if budgets.setdefault(dataset, key) != key:
                raise SystemExit(f"bench_fidelity: --merge {path}: {dataset} was run with another budget or "
                                 f"recipe overrides ({key} vs {budgets[dataset]})")
            if part["runs"].get("deepmetric"):
                losses = part.get("recipe_losses")
                if recipes.setdefault(dataset, losses) != losses:
                    raise SystemExit(f"bench_fidelity: --merge {path}: deepmetric's recipe for {dataset} has other "
                                     f"losses here ({losses}) than in an earlier file ({recipes[dataset]})")
            for name, overrides in (part.get("variants") or {}).items():
                if variants.setdefault(name, overrides) != overrides:
                    raise SystemExit(f"bench_fidelity: --merge {path}: variant {name} is {overrides} here but "
                                     f"{variants[name]} in an earlier file")
            rows = merged.setdefault(dataset, {})
            for system, runs in part["runs"].items():
                have = rows.setdefault(system, [])
                seen = {r.get("seed") for r in have} - {None}
                for r in runs:
                    if r.get("seed") in seen:  # the untrained network of a seed is the same in every file
                        if system == "untrained":
                            continue
                        raise SystemExit(f"bench_fidelity: --merge {path}: {dataset} {system} seed {r['seed']} "
                                         "is in an earlier file too")
                    have.append(r)
    return merged


def print_tables(rows_by_dataset: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> Dict[str, str]:
    """Each dataset's table and the deepmetric recipe chosen on validation; returns the choices."""
    chosen_by_dataset = {}
    for dataset, rows in rows_by_dataset.items():
        print(table(dataset, rows), flush=True)
        ours = [s for s in rows if s == "deepmetric" or s.startswith("deepmetric_")]
        chosen = choose_on_validation(rows, ours, load_config(RECIPES[dataset]).eval.metric)
        print(f"deepmetric's recipe chosen on validation: {chosen[0]} (mean validation "
              + ", ".join(f"{k} {v:.4f}" for k, v in chosen[1].items()) + ")", flush=True)
        chosen_by_dataset[dataset] = chosen[0]
    return chosen_by_dataset


ROTATE = "data.val_classes=<fold seed>"  # the budget entry of --rotate-validation


def validation_fold(train_classes: List[Any], fraction: float, fold: int) -> List[Any]:
    """Fold ``fold`` of a class-disjoint cross-validation over ``train_classes``: ``n`` =
    ``max(2, round(fraction * C))`` consecutive classes, starting ``fold * n`` places in (cyclic), so
    ``C`` folds validate every class ``n`` times (Fashion's 5 training classes: 01, 23, 40, 12, 34)."""
    c = len(train_classes)
    n = max(2, round(fraction * c))
    return [train_classes[(fold * n + j) % c] for j in range(n)]


def recipe(dataset: str, seed: int, budget: List[str], recipe_overrides: List[str], cjk_root: Optional[str]) -> Config:
    extra = [f"seed={seed}"] + [b for b in budget if b != ROTATE]
    if dataset == "cjk_glyphs":
        extra.append(f"data.root={cjk_root}")
    cfg = load_config(RECIPES[dataset], extra + list(recipe_overrides))
    if ROTATE not in budget:
        return cfg
    d = cfg.data
    if not isinstance(d.train_classes, list) or not isinstance(d.val_classes, float):
        raise SystemExit(f"bench_fidelity: --rotate-validation needs {RECIPES[dataset].name} to list "
                         "data.train_classes and give data.val_classes as a fraction")
    fold = json.dumps(validation_fold(list(d.train_classes), d.val_classes, seed))
    return load_config(RECIPES[dataset], extra + [f"data.val_classes={fold}"] + list(recipe_overrides))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--cjk-root", default="/tmp/cjk_glyphs", help="folder written by make_glyph_benchmark.py")
    ap.add_argument("--set", dest="budget", nargs="*", default=[],
                    help="overrides of the shared budget, for every system (e.g. train.max_steps=200)")
    ap.add_argument("--rotate-validation", action="store_true",
                    help="seed k validates on fold k of a class-disjoint cross-validation over the training "
                         "classes (validation_fold); without it every seed validates on the same classes")
    ap.add_argument("--recipe", dest="recipe", nargs="*", default=[],
                    help="overrides of deepmetric's recipe only (e.g. losses.0.params.miner_epsilon=0.1)")
    ap.add_argument("--variant", dest="variants", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                    help="another deepmetric recipe, as a system of its own: a name, then overrides of the "
                         "recipe (e.g. --variant triplet 'losses=[{name: triplet, params: {mining: hard}}]'); "
                         "the table then names the deepmetric recipe with the best mean validation metric")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--full-map-limit", type=int, default=12000,
                    help="largest test set on which AccuracyCalculator also computes full mAP (k=None)")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="run nothing: print the tables of these "
                    "--json files together (e.g. seeds run in separate processes)")
    args = ap.parse_args(argv)
    if args.merge:
        print_tables(merge_reports(args.merge))
        return 0
    if args.rotate_validation:  # recorded with the budget: --merge keeps the two protocols apart
        args.budget = list(args.budget) + [ROTATE]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging
    logging.getLogger("deepmetric").setLevel(logging.WARNING)
    report: Dict[str, Any] = {"argv": sys.argv, "load_before": os.getloadavg(), "datasets": {}}
    work = Path(tempfile.mkdtemp(prefix="bench_fidelity_"))
    variants = {f"deepmetric_{v[0]}": v[1:] for v in args.variants}
    systems = list(args.systems) + list(variants)
    for dataset in args.datasets:
        losses = recipe(dataset, args.seeds[0], args.budget, args.recipe, args.cjk_root).to_dict()["losses"]
        rows: Dict[str, List[Dict[str, Any]]] = {"untrained": []}
        rows.update({s: [] for s in systems})
        for seed in args.seeds:
            for system in systems:
                ours = system == "deepmetric" or system in variants
                overrides = args.recipe if system == "deepmetric" else variants.get(system, [])
                cfg = recipe(dataset, seed, args.budget, overrides, args.cjk_root)
                t0 = time.perf_counter()
                if ours:
                    r = run_deepmetric(cfg, work / f"{dataset}-{seed}-{system}")
                    if len(rows["untrained"]) < args.seeds.index(seed) + 1:
                        rows["untrained"].append({"test": r["untrained"]["test"], "val": r["untrained"].get("val"),
                                                  "seed": seed})
                else:
                    r = run_pml_loop(cfg, system)
                r["pml_check"] = pml_accuracy(r.pop("embeddings"), r.pop("labels"), args.full_map_limit)
                r["check_diff"] = cross_check(r["test"], r["pml_check"])
                r["load"], r["seed"] = os.getloadavg(), seed
                rows[system].append(r)
                print(f"[{dataset} seed {seed}] {system:<12} test map@r {r['test']['map@r']:.4f} "
                      f"R@1 {r['test']['recall@1']:.4f} (val {cfg.eval.metric} {r['val'][cfg.eval.metric]:.4f} "
                      f"at step {r['step']}); {r['images'] / r['train_s']:.0f} img/s; "
                      f"{time.perf_counter() - t0:.0f} s; PML check diff "
                      f"{max(abs(v) for v in r['check_diff'].values()):.2e}", flush=True)
                report["datasets"][dataset] = {"recipe": str(RECIPES[dataset]), "budget": args.budget,
                                               "recipe_overrides": args.recipe, "recipe_losses": losses,
                                               "variants": variants, "runs": rows}
                if args.json:  # after every run: a long table interrupted keeps what it measured
                    atomic_write(args.json, json.dumps(report, indent=1, default=float))
        report["datasets"][dataset]["chosen_on_validation"] = print_tables({dataset: rows})[dataset]
    report["load_after"] = os.getloadavg()
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
