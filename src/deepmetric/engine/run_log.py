"""What a training run writes beside its checkpoints: its notes, ``metrics.jsonl``, TensorBoard events.

- :class:`collect_notes`: while inside, the warnings logged through ``deepmetric`` become notes of
  the run (its summary's ``notes``); :class:`warnings_as_notes` does the same for Python warnings;
- :func:`truncate_log`: a resumed run drops the log rows written after the checkpoint it continues;
- :func:`tensorboard_writer`: the events writer, or None without TensorBoard;
- :func:`split_sizes`: a few words per evaluation split, for the summary;
- :class:`Recorder`: the callback that writes ``metrics.jsonl``, TensorBoard and ``trainer.history``.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..core.files import atomic_write
from ..data.base import DataSplits
from .callbacks import LogRecords

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


class warnings_as_notes:
    """While inside, Python warnings (a metric's skipped queries) become notes of the run, prefixed by
    ``where`` (``step 50, val``), and are warned again."""

    def __init__(self, notes: List[str], where: str) -> None:
        self.notes, self.where = notes, where
        self._catch = warnings.catch_warnings(record=True)

    def __enter__(self) -> None:
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc) -> None:
        self._catch.__exit__(*exc)
        for w in self._caught:
            note = f"{self.where}: {w.message}"
            if note not in self.notes:
                self.notes.append(note)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


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


def run_summary(trainer: Any, result: Any, selected: int) -> Dict[str, Any]:
    """What ``fit()`` returns and ``metrics.json`` holds: the selected ``step`` and its test metrics
    (``result``), the untrained network's, the selection's validation metrics, and the run's facts."""
    import dataclasses

    from .interrupt import StopReason

    how = trainer.selection.summary()
    return {
        "checkpoint": str(trainer.run_dir / "checkpoints" / "best"), "step": selected, "last_step": trainer.step,
        "max_steps": trainer.cfg.train.max_steps, "selected_by": how["selected_by"],
        "evaluations": trainer.evaluations, "stopped_early": trainer.stop_reason is StopReason.EARLY_STOPPING,
        "metrics": result.metrics, "val": how["val"], "untrained": trainer.untrained,
        "splits": split_sizes(trainer.splits),
        "budget": None if trainer.budget_plan is None else dataclasses.asdict(trainer.budget_plan),
        "length_folds": None if trainer.fold_length is None else trainer.fold_length.summary(),
        "sources": dict(trainer.sources), "notes": trainer.notes,
    }


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


class Recorder(LogRecords):
    """The run's record: every training row (``train.log_every`` steps) and every evaluation row (the
    final test excepted: it is in ``metrics.json``) in ``trainer.history``, ``metrics.jsonl`` and
    TensorBoard events. A resumed run first drops the rows written after its checkpoint. The
    trainer puts it first among the callbacks, on the main rank, which alone writes."""

    def __init__(self) -> None:
        super().__init__(self.write)  # the rows LogRecords hands on_log are the ones recorded
        self.history: List[Dict[str, Any]] = []
        self._file: Optional[Any] = None
        self._writer: Optional[Any] = None

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.resume:  # rows written after the checkpoint we continue from would repeat
            truncate_log(trainer.run_dir / "metrics.jsonl", trainer.step)
        self._writer = tensorboard_writer(trainer.run_dir, purge_step=trainer.step + 1 if trainer.resume else None)
        self._file = open(trainer.run_dir / "metrics.jsonl", "a")

    def write(self, rec: Dict[str, Any]) -> None:
        self.history.append(rec)
        if self._file is None:
            return
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._writer is not None:
            flat = rec.get("eval", rec)
            prefix = f"{rec.get('split', 'eval')}/" if "eval" in rec else "train/"
            for k, v in flat.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._writer.add_scalar(prefix + k, v, rec["step"])

    def close(self) -> None:
        for handle in (self._file, self._writer):
            if handle is not None:
                handle.close()
        self._file = self._writer = None

    def on_fit_end(self, trainer: Any, summary: Dict[str, Any]) -> None:
        self.close()

    def on_fit_error(self, trainer: Any, exc: BaseException) -> None:
        self.close()
