"""Experiment tracking: a run logged to MLflow, as a :class:`~deepmetric.engine.callbacks.Callback`.

Turned on by the recipe (``tracking.mlflow={}``, see :class:`~deepmetric.config.MLflowConfig`) or
passed in Python (``Trainer(..., callbacks=[MLflowCallback(...)])``). It logs

- params: the resolved recipe, flattened (``optimizer.lr``, ``losses.0.params.margin``);
- metrics by step: ``train/loss``, ``train/lr``, ``train/images_per_s`` at each logging step, and
  every evaluation metric prefixed by its split (``val/map_at_r``, ``test/recall_at_1``; MLflow
  names allow no ``@``); the selected checkpoint's test as ``final/...``;
- the run's end: ``FINISHED``, or ``FAILED`` / ``KILLED`` when ``fit()`` raises or is interrupted;
- artefacts at the end: ``config.yaml``, ``metrics.json``, ``metrics.jsonl``, ``report.html`` when
  it exists by then (:class:`~deepmetric.engine.callbacks.WriteReport` before this callback writes
  it: ``deepmetric train`` does), and ``checkpoints/best`` (``log_checkpoint``).

Where: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns`` in the current directory
(a file store: ``mlflow ui --backend-store-uri ./mlruns``). The run's id is kept in the run
directory's ``mlflow.json``, so a resumed run logs on into the same MLflow run. Needs the ``mlflow``
extra (``mlflow-skinny``); the MLflow client is used directly, never the process-wide active run.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..core.errors import UserError
from .callbacks import Callback

#: the extra that brings MLflow
MLFLOW_EXTRA = "mlflow"
RUN_FILE = "mlflow.json"


class TrackingError(UserError):
    """A tracker that cannot run: its package is missing (the message names the extra)."""


def _mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError(f"MLflow tracking (tracking.mlflow) needs the 'mlflow' package, which is not installed: "
                            f"pip install 'deepmetric[{MLFLOW_EXTRA}]'") from None
    return MlflowClient


def metric_key(name: str) -> str:
    """An MLflow-safe metric name: ``@`` as ``_at_``, other characters MLflow refuses as ``_``.

    >>> metric_key("val/recall@1"), metric_key("test/map@r")
    ('val/recall_at_1', 'test/map_at_r')
    """
    return re.sub(r"[^/\w.\- ]", "_", name.replace("@", "_at_"))


def flatten(tree: Any, prefix: str = "") -> Iterator[Tuple[str, str]]:
    """``(dotted key, text)`` for every leaf of a nested dict/list (``None`` as ``null``).

    >>> dict(flatten({"a": {"b": 1, "c": [2, {"d": None}]}, "e": []}))
    {'a.b': '1', 'a.c.0': '2', 'a.c.1.d': 'null', 'e': '[]'}
    """
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, list) and tree and any(isinstance(v, (dict, list)) for v in tree):
        for i, v in enumerate(tree):
            yield from flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], "null" if tree is None else json.dumps(tree) if isinstance(tree, (list, dict)) else str(tree)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``./mlruns`` in the current directory, as a file URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").resolve().as_uri()


class MLflowCallback(Callback):
    """Log a run to MLflow (see the module doc). ``tracking_uri`` None: :func:`default_tracking_uri`;
    ``run_name`` None: the recipe's ``name``."""

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "deepmetric",
                 run_name: Optional[str] = None, log_checkpoint: bool = True) -> None:
        client_class = _mlflow()
        self.tracking_uri = tracking_uri or default_tracking_uri()
        if self.tracking_uri.startswith("file:") or "://" not in self.tracking_uri:
            # MLflow 3.7+ refuses its file store unless asked; it is the one mlflow-skinny can write
            # without SQLAlchemy, and this URI names it on purpose
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client_class(self.tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.log_checkpoint = log_checkpoint
        self.run_id: Optional[str] = None

    @classmethod
    def from_config(cls, c, cfg) -> "MLflowCallback":
        """From a recipe's ``tracking.mlflow`` section ``c``."""
        return cls(c.tracking_uri, c.experiment, c.run_name or cfg.name, c.log_checkpoint)

    # -- the MLflow run ----------------------------------------------------------------------------
    def _run(self, trainer: Any) -> str:
        """The MLflow run of ``trainer``'s run directory: the recorded one on resume, else a new one
        with the recipe as params."""
        if self.run_id is not None:
            return self.run_id
        record = Path(trainer.run_dir) / RUN_FILE
        if trainer.resume and record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("tracking_uri") == self.tracking_uri:
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return self.run_id
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
        run = self.client.create_run(exp_id, run_name=self.run_name or trainer.cfg.name,
                                     tags={"deepmetric.run_dir": str(Path(trainer.run_dir).resolve())})
        self.run_id = run.info.run_id
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}) + "\n")
        self._log_params(trainer)
        return self.run_id

    def _log_params(self, trainer: Any) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(trainer.cfg.to_dict())]
        params += [Param(f"source.{k}", v) for k, v in trainer.sources.items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _log_metrics(self, trainer: Any, values: Dict[str, Any], prefix: str, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics: List[Any] = [Metric(metric_key(prefix + k), float(v), now, step) for k, v in values.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]
        run_id = self._run(trainer)
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    # -- callback ----------------------------------------------------------------------------------
    def on_step_end(self, trainer: Any, record: Dict[str, Any]) -> None:
        if "loss" in record:
            self._log_metrics(trainer, {k: record[k] for k in ("loss", "lr", "images_per_s")}, "train/",
                              record["step"])

    def on_evaluation(self, trainer: Any, split: str, metrics: Dict[str, Any]) -> None:
        prefix = "final/" if trainer.final_test else f"{split}/"
        self._log_metrics(trainer, metrics, prefix, trainer.step)

    def on_fit_end(self, trainer: Any, summary: Dict[str, Any]) -> None:
        run_id = self._run(trainer)
        run_dir = Path(trainer.run_dir)
        for name in ("config.yaml", "metrics.json", "metrics.jsonl", "report.html"):
            if (run_dir / name).is_file():
                self.client.log_artifact(run_id, str(run_dir / name))
        best = run_dir / "checkpoints" / "best"
        if self.log_checkpoint and best.is_dir():
            self.client.log_artifacts(run_id, str(best), artifact_path="checkpoints/best")
        self.client.set_terminated(run_id, "FINISHED")

    def on_fit_error(self, trainer: Any, exc: BaseException) -> None:
        """The MLflow run ends ``KILLED`` (Ctrl-C, SIGTERM) or ``FAILED`` (an error, named in the tag
        ``deepmetric.error``), not left ``RUNNING``; one that failed before it logged anything is
        recorded too."""
        run_id = self._run(trainer)
        if isinstance(exc, KeyboardInterrupt):
            self.client.set_terminated(run_id, "KILLED")
            return
        self.client.set_tag(run_id, "deepmetric.error", f"{type(exc).__name__}: {exc}"[:5000])
        self.client.set_terminated(run_id, "FAILED")
