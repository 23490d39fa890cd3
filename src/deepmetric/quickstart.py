"""``deepmetric quickstart``: the main job, on scikit-learn's real handwritten digits.

Trains on digits 0-4 and retrieves among the unseen digits 5-9 (leave-one-out), printing the untrained
and trained metrics side by side and writing ``report.html`` in the run directory.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Dict, Sequence

from .config import load_config

RECIPE = Path(__file__).parent / "configs" / "quickstart.yaml"
SHOWN = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def format_table(before: Dict[str, float], after: Dict[str, float]) -> str:
    lines = [f"{'metric':<10} {'untrained':>10} {'trained':>10}"]
    for k in SHOWN:
        if k in after:
            lines.append(f"{k:<10} {before.get(k, float('nan')):>10.4f} {after[k]:>10.4f}")
    return "\n".join(lines)


def run_quickstart(run_dir: str = "runs/quickstart", overrides: Sequence[str] = (), fresh: bool = True) -> Dict:
    from .engine.trainer import Trainer
    from .viz.report import write_report

    cfg = load_config(RECIPE, overrides)
    run_dir = Path(run_dir)
    if fresh and run_dir.exists():  # the quickstart always starts over
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    before = trainer.evaluator.evaluate(trainer.model)
    print(f"digits: {len(trainer.splits.train)} training images (classes 0-4), "
          f"{len(trainer.splits.query)} test images of unseen classes 5-9")
    trainer.fit()
    result = trainer.last_result  # the evaluation of the final step
    after = result.metrics
    report = write_report(run_dir, trainer.history, result, cfg=cfg, dataset=trainer.splits.query, before=before)
    print(format_table(before, after))
    print(f"trained {cfg.train.max_steps} steps in {time.perf_counter() - t0:.0f} s; run directory {run_dir}; report {report}")
    return {"before": before, "after": after, "report": str(report), "run_dir": str(run_dir)}
