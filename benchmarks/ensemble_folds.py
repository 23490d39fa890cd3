"""Few training classes: does an ensemble of short runs beat one run of the same CPU time, on validation?

With few training classes the automatic recipe's folds stop the run early (50-560 steps of the
thousands a 2-minute budget buys), and two seeds of one split differ by as much as the recipe gains
over the PML loop. An ensemble of independently seeded runs, each of the chosen length, averages that
spread away; its cost is the members' steps. This measures it on the validation folds only (the
few-class tasks of ``bench_suite.py curves``: digits' and Fashion's rotating folds of two training
classes, and with ``--classes K`` few-class tasks carved from the many-class data sets), never on test.

For each fold it trains the default (the automatic recipe, weight average included) with seeds
``0 .. members-1`` for ``L`` steps each, and seed 0 for ``members x L`` steps, and scores on the
held-out classes (MAP@R):

- each member alone, and their mean (what one run of length ``L`` scores);
- the ensemble of the first ``m`` members, for ``m = 2 .. members``: their L2-normalised embeddings
  side by side, divided by ``sqrt(m)`` (its cosine similarity is the members' mean cosine), as
  ``model.members`` joins them;
- the long run: one model for the ensemble's CPU time;
- with ``--joint``, the members trained as deepmetric trains them: one run of ``model.members``
  (seed 0), each member with its own initial weights and loss, on the same batches.

::

    python benchmarks/ensemble_folds.py --datasets digits fashion --steps digits=100,fashion=200 --json ens.json
    python benchmarks/ensemble_folds.py --datasets cjk icons --classes 20 --steps cjk=90,icons=90 --json ens20.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_suite import DATASETS, auto_recipe, curve_tasks, fold_session  # noqa: E402

from deepmetric.config import load_config  # noqa: E402
from deepmetric.core.files import atomic_write  # noqa: E402
from deepmetric.engine.build import build_data, model_from_checkpoint  # noqa: E402
from deepmetric.engine.checkpoint import read_checkpoint  # noqa: E402
from deepmetric.engine.extract import extract  # noqa: E402
from deepmetric.engine.folds import validation_curve  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402
from deepmetric.evaluation.retrieval import retrieval_metrics  # noqa: E402
from deepmetric.models import join_embeddings  # noqa: E402


def embed(model, dataset):
    """``(vectors, labels)``: the model's L2-normalised embeddings of ``dataset`` (one network's, or an
    ensemble's side by side), extracted as ``deepmetric eval`` extracts them."""
    found = extract(model, dataset)
    return F.normalize(found.vectors, dim=1), torch.as_tensor(found.labels)


def validation_vectors(run: Path):
    """The run's last checkpoint (the weight average under ``train.ema``) on its validation split:
    ``(query vectors, query labels, gallery vectors or None, gallery labels or None, distance)``."""
    cfg = load_config(str(run / "config.yaml"), [])
    ckpt, _ = read_checkpoint(run / "checkpoints" / "last")
    model = model_from_checkpoint(cfg, ckpt).eval()
    val = build_data(cfg, validation=True).val
    q, ql = embed(model, val.query)
    if val.gallery is None:
        return q, ql, None, None, cfg.eval.distance
    g, gl = embed(model, val.gallery)
    return q, ql, g, gl, cfg.eval.distance


def map_at_r(parts) -> float:
    q, ql, g, gl, distance = parts
    return float(retrieval_metrics(q, ql, g, gl, ks=(1,), distance=distance)["map@r"])


def ensemble(members) -> tuple:
    """The members' embeddings side by side (:func:`deepmetric.models.join_embeddings`, as
    ``model.members`` joins them)."""
    q = join_embeddings([m[0] for m in members])
    g = None if members[0][2] is None else join_embeddings([m[2] for m in members])
    first = members[0]
    return q, first[1], g, first[3], first[4]


def train(root: Path, name: str, seed: int, steps: int, overrides: List[str], run_dir: Path):
    """Train the default for ``steps`` steps; its last checkpoint's validation vectors, checked against
    the MAP@R the run itself recorded there."""
    cfg = auto_recipe(root, name, seed, "2m", [*overrides, "train.time_budget=null", f"train.max_steps={steps}",
                                              f"train.eval_every={steps}"])
    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    recorded = dict(validation_curve(trainer, "map@r"))[steps]
    vectors = validation_vectors(run_dir)
    if abs(map_at_r(vectors) - recorded) > 1e-4:
        raise SystemExit(f"{run_dir}: the checkpoint scores {map_at_r(vectors):.5f}, the run recorded {recorded:.5f}")
    return vectors


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/suite")
    ap.add_argument("--datasets", nargs="+", default=["digits", "fashion"], choices=list(DATASETS))
    ap.add_argument("--steps", type=lambda t: dict(item.split("=") for item in t.split(",")),
                    default="digits=100,fashion=200", help="NAME=STEPS,...: each member's length")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--long", type=int, default=None,
                    help="the long run's length in members' lengths (default: --members; 0: no long run)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--joint", action="store_true",
                    help="also train the members as one run (model.members): how deepmetric trains them")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out, work = fold_session(args, "bench_ensemble_")
    long_factor = args.members if args.long is None else args.long
    for name, task, data, fold_of in curve_tasks(args):
        root = Path(args.root) / DATASETS[name].folder
        steps = int(args.steps[name])
        for f in range(args.folds):
            key = f"{task}/{f}"
            if key not in out:
                overrides = [*fold_of(f), *data]
                runs = []
                for seed in range(args.members):
                    run = work / f"{key.replace('/', '-')}-s{seed}"
                    runs.append(train(root, name, seed, steps, overrides, run))
                singles = [map_at_r(r) for r in runs]
                out[key] = {"singles": singles,
                            "ensembles": {m: map_at_r(ensemble(runs[:m])) for m in range(2, args.members + 1)},
                            "steps": steps}
                if long_factor:
                    long_run = train(root, name, 0, steps * long_factor, overrides,
                                     work / f"{key.replace('/', '-')}-long")
                    out[key].update({"long": map_at_r(long_run), "long_factor": long_factor})
                if args.json:
                    atomic_write(args.json, json.dumps(out, indent=1))
            if args.joint and "joint" not in out[key]:  # the product's way: one run of model.members
                joint = train(root, name, 0, steps, [*fold_of(f), *data, f"model.members={args.members}"],
                              work / f"{key.replace('/', '-')}-joint")
                out[key]["joint"] = map_at_r(joint)
                if args.json:
                    atomic_write(args.json, json.dumps(out, indent=1))
            r = out[key]
            ens = " ".join(f"{m}: {v:.4f}" for m, v in r["ensembles"].items())
            joint = f", model.members={args.members} {r['joint']:.4f}" if "joint" in r else ""
            longer = f", one run of {r.get('long_factor', args.members)}x the steps {r['long']:.4f}" if "long" in r else ""
            print(f"{key}: single {statistics.fmean(r['singles']):.4f} (seed 0 {r['singles'][0]:.4f}), "
                  f"ensembles {ens}{longer}{joint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
