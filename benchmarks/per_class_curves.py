"""Per-class MAP@R at every evaluation of one benchmark run, on the validation and the test split.

A diagnosis, not a selection: it trains one system of ``bench_fidelity.py`` (deepmetric's recipe,
with ``--set`` overrides) with ``eval.test_during_training=true`` and prints, for each evaluation,
the mean MAP@R of each class's queries. It shows which classes a run's training helps and which it
costs, and whether the validation classes see the same thing as the test classes::

    python benchmarks/per_class_curves.py --dataset fashion_mnist --seed 1 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fidelity as bf  # noqa: E402

from deepmetric.config import load_config  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402
from deepmetric.evaluation.retrieval import retrieval_metrics  # noqa: E402


def per_class_map_at_r(vectors, labels) -> Dict[int, float]:
    """Leave-one-out MAP@R of each class's queries (cosine, as the benchmarks' recipes)."""
    labels = np.asarray(labels)
    per_query = retrieval_metrics(vectors, labels, return_per_query=True)["per_query"]["map@r"]
    return {int(c): float(per_query[labels == c].mean()) for c in np.unique(labels)}


class _Recording(Trainer):
    rows: List[Dict]

    def evaluate(self, split, *args, **kwargs):
        result = super().evaluate(split, *args, **kwargs)
        q = result.query
        self.rows.append({"step": self.step, "split": split, "final": self.final_test,
                          "classes": per_class_map_at_r(q.vectors, q.labels)})
        return result


def curves(cfg) -> List[Dict]:
    """The per-class rows of one run of ``cfg``, in evaluation order (the final test of the
    selected step last, marked ``final``)."""
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"test_during_training": True})})
    with tempfile.TemporaryDirectory(prefix="per_class_") as work:
        trainer = _Recording(cfg, Path(work) / "run")
        trainer.rows = []
        trainer.fit()
    return trainer.rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist", choices=list(bf.RECIPES))
    ap.add_argument("--recipe", help="a recipe file instead of the benchmark's --dataset (seed and --set apply)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="recipe overrides (e.g. train.ema=0.99)")
    ap.add_argument("--cjk-root", default="/tmp/cjk_glyphs")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.recipe:
        cfg = load_config(args.recipe, [f"seed={args.seed}", *args.overrides])
    else:
        cfg = bf.recipe(args.dataset, args.seed, [], args.overrides, args.cjk_root)
    rows = curves(cfg)
    for r in rows:
        where = "test (selected)" if r["final"] else r["split"]
        print(f"step {r['step']:>5}  {where:<15}  " + "  ".join(f"{c}: {v:.3f}" for c, v in r["classes"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
