"""Runs on disk: a recipe trained into a run directory, a run (or a checkpoint) evaluated into one.

What ``deepmetric train`` and ``deepmetric eval`` do, as functions: the CLI parses, calls one of them
and prints. Evaluation writes ``metrics.json`` (keeping what the training summary recorded about the
same checkpoint) and, when asked, ``neighbours.jsonl`` (each query's top K; see
:class:`~deepmetric.core.results.RetrievalResults`); it refuses a config that now builds another test
split than the run recorded in ``splits.json``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..config import Config, ConfigError, load_config, resolve_recipe
from ..core.distributed import init_distributed, rank_device
from ..core.errors import UserError
from ..core.files import atomic_write
from ..core.results import EvalResult
from ..data.base import DataSplits
from ..data.protocol import describe_splits, split_differences
from .auto import auto_config, is_data_path
from .build import build_data, model_from_checkpoint
from .callbacks import Callback
from .checkpoint import read_checkpoint
from .evaluator import Evaluator
from .trainer import Trainer

log = logging.getLogger("deepmetric")


def trainer_for(config: Optional[str], overrides: Sequence[str] = (), run_dir: Optional[str] = None,
                resume: Optional[str] = None, callbacks: Sequence[Callback] = ()) -> Trainer:
    """The :class:`Trainer` of ``deepmetric train``: a recipe (a file or a packaged name) with
    ``overrides`` into ``run_dir`` (default the recipe's ``run_dir``, else ``runs/<name>``), or, with
    ``resume``, that run directory continued from its last checkpoint (only ``train.*`` keys may change);
    with ``callbacks`` (the CLI's :class:`~deepmetric.engine.callbacks.WriteReport`)."""
    if resume:
        if not (Path(resume) / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: not a run directory (no config.yaml); give the folder a "
                              f"`deepmetric train` wrote")
        cfg = load_config(Path(resume), overrides)
        bad = [o.split("=", 1)[0] for o in overrides if not o.startswith("train.")]
        if bad:
            raise ConfigError(f"--resume: only train.* keys may change when resuming, not {bad[0]}")
        return Trainer(cfg, Path(resume), resume=True, callbacks=callbacks)
    if not config:
        raise ConfigError("train: give your images (a folder with a subfolder per class, or a list file), a "
                          "recipe (e.g. configs/fashion_mnist.yaml), or --resume RUN_DIR")
    if is_data_path(config):  # your own images: a recipe written from the data, each choice said
        auto = auto_config(config, overrides)
        log.info("%s: a recipe from the data (key=value overrides any choice):\n%s", config, auto.describe())
        trainer = Trainer(auto.config, Path(run_dir or auto.config.run_dir or f"runs/{auto.config.name}"),
                          callbacks=callbacks)
        trainer.notes.extend(auto.notes)
        return trainer
    cfg = load_config(resolve_recipe(config), overrides)
    return Trainer(cfg, Path(run_dir or cfg.run_dir or f"runs/{cfg.name}"), callbacks=callbacks)


@dataclass
class Evaluation:
    """What :func:`evaluate` did: the result, and where it came from and went to."""

    result: EvalResult
    cfg: Config
    splits: DataSplits
    checkpoint: Path
    step: Optional[int]
    out_dir: Path
    #: under torchrun only rank 0 writes (and the CLI prints); the other ranks embedded their shard
    is_main: bool = True
    neighbours: Optional[Path] = None


def evaluate(target: str, overrides: Sequence[str] = (), checkpoint: Optional[str] = None,
             output: Optional[str] = None, neighbours: int = 0) -> Evaluation:
    """``deepmetric eval``: a run directory's checkpoint (``checkpoint`` default: its best), or a
    recipe with ``checkpoint``, evaluated by the recipe's protocol; ``metrics.json`` (and with
    ``neighbours`` K, ``neighbours.jsonl``) written to ``output`` (default: the run directory, or the
    checkpoint's parent). Under ``torchrun`` each rank embeds a shard and rank 0 writes."""
    path = Path(target)
    run_dir = path if path.is_dir() and (path / "config.yaml").is_file() else None
    cfg = load_config(run_dir if run_dir is not None else resolve_recipe(target), overrides)
    if run_dir is None and not checkpoint:
        raise ConfigError("eval: a recipe needs --checkpoint PATH (or pass a run directory)")
    ckpt_path = checkpoint or run_dir
    out_dir = Path(output) if output else run_dir if run_dir is not None else Path(checkpoint).parent
    if neighbours < 0 or (neighbours and cfg.eval.protocol == "verification"):
        raise UserError(f"eval --neighbours {neighbours}: give K >= 1 for a retrieval or re-ID protocol "
                        f"(this recipe's protocol is {cfg.eval.protocol})")
    ckpt, ckpt_state = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(cfg, ckpt)  # first: a model given in Python stops here, before the data
    dist = init_distributed()
    device = rank_device(cfg.train.device, dist)
    splits = build_data(cfg, validation=False)
    if run_dir is not None and not any(o.startswith("data.") for o in overrides):
        check_recorded_splits(run_dir, splits)
    model.to(device).eval()
    result = Evaluator(cfg, splits, device).run(model)
    out = Evaluation(result, cfg, splits, ckpt, ckpt_state.get("step"), out_dir, dist.is_main)
    if not dist.is_main:
        return out
    _write_metrics(out_dir / "metrics.json", result.metrics, ckpt, out.step, keep_previous=not overrides)
    if neighbours:
        out.neighbours = write_neighbours(out_dir / "neighbours.jsonl", result, neighbours, cfg.eval.distance)
    return out


def _write_metrics(path: Path, metrics: Dict[str, Any], ckpt: Path, step: Optional[int], keep_previous: bool) -> None:
    """``metrics.json``: the checkpoint, its step and the metrics; the training summary's facts about
    the same checkpoint (untrained, validation, selection) stay when the recipe is unchanged."""
    written = {"checkpoint": str(ckpt), "step": step, **metrics}
    previous = _read_json(path)
    if keep_previous and previous.get("checkpoint") == str(ckpt) and previous.get("step") == step:
        written.update({k: v for k, v in previous.items() if k not in written})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(written, indent=1))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_recorded_splits(run_dir: Path, splits: DataSplits) -> None:
    """Refuse to score a run on another test set than it was tested on (``splits.json``)."""
    recorded = _read_json(run_dir / "splits.json")
    if not recorded:
        log.warning("%s has no splits.json (a run from an older version): the test split is not checked",
                    run_dir)
        return
    diffs = split_differences(recorded, describe_splits(splits), "test")
    if not diffs:
        return
    how = ("the run was trained on splits given in Python (Trainer(..., splits=...)), which its config cannot "
           "rebuild: evaluate it in Python with the same splits (model, cfg, _ = deepmetric.load_for_inference(RUN); "
           "deepmetric.Evaluator(cfg, splits).run(model))"
           if recorded.get("source") == "python" else
           "the data changed since training, or pass data.* overrides to score other data on purpose")
    raise UserError(f"{run_dir / 'splits.json'}: the config now builds another test split than the run's: "
                    f"{'; '.join(diffs)}; {how}")


def write_neighbours(path: Path, result: EvalResult, k: int, distance: str) -> Path:
    """``neighbours.jsonl``: one line per query with its top ``k`` (see :func:`deepmetric.evaluation.retrieval_results`)."""
    from ..evaluation import retrieval_results

    q, g = result.query, result.gallery
    ref = q if g is None else g
    res = retrieval_results(q.vectors, q.labels, None if g is None else g.vectors, None if g is None else g.labels,
                            k=k, distance=distance, query_camids=q.camids,
                            gallery_camids=None if g is None else g.camids)
    lines = (json.dumps(r) for r in res.records(q.labels, ref.labels, q.paths, ref.paths))
    return atomic_write(path, "\n".join(lines) + "\n")
