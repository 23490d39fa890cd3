"""``deepmetric quickstart``: the main job, on characters rendered from real typefaces.

A class is a character, an image one of the 16 text faces matplotlib ships (so the data comes with
``pip install``). Half of the characters train; a tenth of those are held out as the validation
split that selects the checkpoint; the other half, never seen in training or selection, are queried
leave-one-out. It prints the untrained network beside the selected checkpoint and writes
``report.html`` in the run directory.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from .config import ConfigError, load_config

RECIPE = Path(__file__).parent / "configs" / "quickstart.yaml"
#: the file that marks a folder as the quickstart's own, so that a rerun may clear it
MARKER = ".deepmetric-quickstart"
#: what a quickstart run writes; a rerun removes these and nothing else
WRITES = ("config.yaml", "splits.json", "metrics.json", "metrics.jsonl", "neighbours.jsonl", "report.html",
          "checkpoints", "tensorboard", "plots")


def prepare_run_dir(run_dir: Path) -> None:
    """A fresh folder for the quickstart, deleting nothing it did not write.

    A missing or empty folder is used (and marked); a folder the quickstart wrote before (it holds
    :data:`MARKER`) has its previous run's files removed, anything else in it kept; any other
    non-empty folder is refused.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"quickstart --run-dir {run_dir}: a file, not a folder")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if entries and MARKER not in entries:
        raise ConfigError(f"quickstart --run-dir {run_dir}: the folder holds files the quickstart did not write "
                          f"({', '.join(entries[:3])}{' ...' if len(entries) > 3 else ''}); choose a new or empty folder")
    for name in WRITES:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("written by `deepmetric quickstart`, which may clear this folder when rerun\n")


def run_quickstart(run_dir: str = "runs/quickstart", overrides: Sequence[str] = ()) -> Dict:
    from .engine.callbacks import WriteReport
    from .engine.trainer import Trainer
    from .viz.report import write_run_report
    from .viz.summary import format_summary

    cfg = load_config(RECIPE, overrides)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    prepare_run_dir(run_dir)
    report = WriteReport(write_run_report)
    trainer = Trainer(cfg, run_dir, callbacks=[report])
    s = trainer.splits
    faces = "?" if s.train.camids is None else len(np.unique(s.train.camids))  # glyphs: a face's camera id
    print(f"{cfg.data.format}: {s.train.num_classes} training characters x {faces} typefaces "
          f"({len(s.train)} images); {s.val.query.num_classes if s.val else 0} held-out characters select the "
          f"checkpoint; {s.query.num_classes} unseen characters ({len(s.query)} images) are the test")
    summary = trainer.fit()
    print(format_summary(summary))
    print(f"{time.perf_counter() - t0:.0f} s in all; run directory {run_dir}; report {report.path}")
    return summary
