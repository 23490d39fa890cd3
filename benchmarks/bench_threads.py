"""A training step of the automatic recipe on one CPU thread against torch's default count, in one run.

The figures behind ``train.threads`` (docs/your-own-images.md, "On a busy machine"): the median step
of ``deepmetric train DIR``'s recipe for a folder, timed as the time budget times it
(:func:`deepmetric.engine.budget.measure_steps`), alternately on one thread and on torch's default,
``--repeat`` times each. Run it idle, then with other work on the cores (for example two
``bench_suite.py run --threads 1`` processes on a 2-core machine):

    python benchmarks/bench_threads.py /tmp/suite/qs_glyphs /tmp/suite/icons /tmp/suite/digits
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import List, Optional

import torch

from deepmetric.engine.auto import auto_config
from deepmetric.engine.budget import measure_steps
from deepmetric.engine.trainer import Trainer


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="image folders (a class subfolder each)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per thread count, alternating")
    ap.add_argument("--steps", type=int, default=10, help="steps timed per timing (after 3 of warm-up)")
    args = ap.parse_args(argv)
    many = torch.get_num_threads()
    print(f"torch's default: {many} threads; load average {os.getloadavg()[0]:.2f}")
    for root in args.folders:
        cfg = auto_config(root, ["train.max_steps=50", "train.progress=false", "train.length_folds=[]",
                                 "train.fold_candidates=[]"]).config
        times = {1: [], many: []}
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, run_dir)
            for _ in range(args.repeat):
                for n in (1, many):
                    torch.set_num_threads(n)
                    times[n].append(measure_steps(trainer, steps=args.steps, warmup=3) * 1000)
        torch.set_num_threads(many)
        cells = "  ".join(f"{n} thread{'s' if n > 1 else ''}: median {statistics.median(t):.1f} ms "
                          f"({', '.join(f'{x:.1f}' for x in t)})" for n, t in times.items())
        print(f"{os.path.basename(os.path.normpath(root))}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
