"""Two-process checks: spawn the ranks, collect what each reported."""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch.multiprocessing as mp

from deepmetric.core.files import atomic_write


def report(out_dir: str, rank: int, results: Dict[str, Any]) -> None:
    """A rank's results, written whole (:func:`~deepmetric.core.files.atomic_write`) before the rank
    leaves its group."""
    atomic_write(os.path.join(out_dir, f"rank{rank}.pkl"), pickle.dumps(results))


def spawn_and_collect(worker: Callable, args: tuple, out: Path, world: int) -> List[Dict[str, Any]]:
    """Run ``worker(rank, *args)`` on ``world`` processes and return each rank's :func:`report`.

    gloo can rarely abort a process while it takes its group down ("terminate called without an
    active exception"), after the checks are done. A rank that aborts *after* reporting does not fail
    the checks it reported; one that aborts before, or reports nothing, does."""
    try:
        mp.spawn(worker, args=args, nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        if not all((out / f"rank{r}.pkl").is_file() for r in range(world)):
            raise
        warnings.warn(f"a rank aborted after reporting its results (in the process group's teardown): {e}")
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
