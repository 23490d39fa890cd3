"""What a training run writes beside its checkpoints: its notes, ``metrics.jsonl``, TensorBoard events.

- :class:`collect_notes`: while inside, the warnings logged through ``deepmetric`` become notes of
  the run (its summary's ``notes``);
- :func:`truncate_log`: a resumed run drops the log rows written after the checkpoint it continues;
- :func:`tensorboard_writer`: the events writer, or None without TensorBoard;
- :func:`split_sizes`: a few words per evaluation split, for the summary.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..core.files import atomic_write
from ..data.base import DataSplits

log = logging.getLogger("deepmetric")


class _NoteCollector(logging.Handler):
    """The ``deepmetric`` logger's warnings, as notes of a run (its summary's ``notes``)."""

    def __init__(self, notes: List[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.notes:
            self.notes.append(message)


class collect_notes:
    """While inside, the warnings logged through ``deepmetric`` are appended to ``notes``."""

    def __init__(self, notes: List[str]) -> None:
        self.handler = _NoteCollector(notes)

    def __enter__(self) -> None:
        log.addHandler(self.handler)

    def __exit__(self, *exc) -> None:
        log.removeHandler(self.handler)


def split_sizes(splits: DataSplits) -> Dict[str, str]:
    """A few words per evaluation split, for the summary's column heads."""
    def words(s: Optional[DataSplits]) -> Optional[str]:
        if s is None:
            return None
        if s.pairs is not None:
            return f"{len(s.pairs.left)} pairs"
        sets = [d for d in (s.query, s.gallery) if d is not None]
        classes = len(np.unique(np.concatenate([d.labels for d in sets])))
        images = len(s.query) + (0 if s.gallery is None else len(s.gallery))
        return f"{classes} classes, {images} images"

    return {"val": words(splits.val), "test": words(splits) if splits.query is not None or splits.pairs is not None
            else None}


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of ``metrics.jsonl`` after ``step`` (written after the checkpoint a run resumes
    from), so a resumed run's log has each step once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    atomic_write(path, "".join(x + "\n" for x in keep))


def tensorboard_writer(run_dir: Path, purge_step: Optional[int] = None):
    """TensorBoard events; on resume ``purge_step`` hides what was logged after the checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard missing: metrics.jsonl still has everything
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
