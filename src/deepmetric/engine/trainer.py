"""The training loop: a short loop over parts built elsewhere, with hooks that own their concerns.

``Trainer(cfg, run_dir).fit()`` trains for ``train.max_steps`` steps (or the steps that fit
``train.time_budget``, :mod:`.budget`), evaluates every ``train.eval_every`` steps (and at the end)
with the same :class:`~deepmetric.engine.evaluator.Evaluator` that ``deepmetric eval`` uses, and
keeps ``best`` and ``last`` checkpoints. What it is made of:

- :mod:`.parts`: the data, model, losses, optimizers, batches and evaluators (:func:`build_training`);
- :mod:`.step`: the loss of a batch and the optimizer step;
- :mod:`.selection`: how the run selects, chosen once (on validation, or the last step);
- :mod:`.hooks`: behaviours on every rank (``train.ema``'s moving average, which is then what the run
  evaluates, selects and saves);
- :mod:`.callbacks`: the user's hooks on the main rank, among them :class:`~.run_log.Recorder`
  (``metrics.jsonl``, TensorBoard, ``history``) and the progress lines;
- :mod:`.checkpoint`: crash-safe checkpoints; :mod:`.interrupt`: Ctrl-C and SIGTERM, :class:`StopReason`.

``Trainer(cfg, run_dir, resume=True)`` continues from ``last`` exactly: the same batches, the same
random numbers, the same augmented pixels (each sample is augmented under a seed of its own,
whatever ``data.num_workers`` is: see :mod:`deepmetric.data.loading`). Under ``torchrun`` the same
code runs DistributedDataParallel (NCCL on GPUs, gloo on CPU): the batch sampler shards batches by
rank; every loss sees all ranks' embeddings through a gradient-preserving all-gather and every rank
computes the same full loss, so (with DDP's gradient averaging and the gather's gradient sum, see
:mod:`deepmetric.core.distributed`) the update equals one process training on the global batch.
Rank 0 alone writes logs and checkpoints and calls the callbacks; evaluation embeds a shard per
rank, gathers the embeddings and computes exact metrics once.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..config import Config, ConfigError, save_config
from ..core.distributed import barrier, broadcast_object, init_distributed, rank_device
from ..core.files import atomic_write, check_writable, writing
from ..data.base import DataSplits
from ..data.protocol import describe_splits
from ..models.embedder import retrieval_as
from .auto import recipe_or_data
from . import budget
from .budget import budget_seconds, fit_to_budget
from .build import resolve_paths, seed_everything
from .callbacks import Callback, LogRecords, ProgressLog, report_fit_error, run_callbacks
from .checkpoint import load_model_weights, load_train_state, read_checkpoint, save_checkpoint
from .hooks import MovingAverage, TrainingHook
from .interrupt import StopReason, StopRequest, ranks_agree
from .parts import Batches, build_training
from .python_objects import check_sources, mark_python_objects, object_sources
from .run_log import Recorder, collect_notes, run_summary, split_sizes, warnings_as_notes
from .schedule import LRSchedule
from .selection import selection_for
from .step import batch_loss, update

log = logging.getLogger("deepmetric")

#: attributes of the run's parts (:class:`~.parts.TrainingParts`) read through the trainer
_PARTS = {"splits", "model", "net", "losses", "optimizers", "evaluator", "val_evaluator", "scaler", "amp_dtype",
          "channels_last"}


class Trainer:
    """Train one recipe into ``run_dir``. See the module docstring.

    ``cfg``: a :class:`~deepmetric.config.Config`, or a path: your images (a folder with a subfolder
    per class, or a list file: the automatic recipe of :func:`deepmetric.auto_config`) or a recipe
    (a YAML file, a run directory or a packaged recipe's name).

    Objects of your own replace the recipe's parts: ``model`` (any ``nn.Module`` mapping images
    ``(B, C, H, W)`` to embeddings ``(B, D)``), ``loss`` (any ``nn.Module`` called as
    ``loss(embeddings, labels)`` -> scalar; its parameters join the main optimizer), ``splits`` (a
    :class:`~deepmetric.data.DataSplits`) or ``train_dataset`` (a torch ``Dataset`` of ``(image, label)``
    or ``(image, label, index)``; see :mod:`~deepmetric.engine.python_objects`). Checkpoints hold their
    weights like any others: resume by passing the same objects again; ``config.yaml`` names them
    ``python:<class>``. ``callbacks``: :class:`~deepmetric.engine.callbacks.Callback` s; ``on_log``:
    a function called with each ``metrics.jsonl`` row (a :class:`~.callbacks.LogRecords` callback).
    """

    def __init__(self, cfg: Config | str | Path, run_dir: str | Path, resume: bool = False,
                 splits: Optional[DataSplits] = None, on_log: Optional[Callable[[Dict[str, Any]], None]] = None,
                 *, callbacks: Sequence[Callback] = (), model: Optional[torch.nn.Module] = None,
                 loss: Optional[torch.nn.Module] = None, train_dataset: Optional[torch.utils.data.Dataset] = None) -> None:
        self.notes: List[str] = []  # the run's facts and warnings, also in the summary
        if not isinstance(cfg, Config):  # your images (the automatic recipe), or a recipe's path
            cfg, self.notes = recipe_or_data(cfg)
        with collect_notes(self.notes):
            self.sources = object_sources(model, loss, splits, train_dataset)
            self.cfg = mark_python_objects(resolve_paths(cfg), model, loss)
            self.run_dir, self.resume = Path(run_dir), resume
            self.dist = init_distributed()
            self.device = rank_device(self.cfg.train.device, self.dist)
            check_writable(self.run_dir, "run directory", folder=True)
            if not resume and (self.run_dir / "checkpoints").exists():
                raise ConfigError(f"run directory {self.run_dir} already holds checkpoints; "
                                  f"continue it with --resume or choose another --run-dir")
            self._checkpoint = read_checkpoint(self.run_dir, prefer="last") if resume else None
            # everything that can fail on bad input is built before the run directory is touched
            self._build(resume=resume, splits=splits, model=model, loss=loss, train_dataset=train_dataset)
            self.notes += self.parts.notes
            self.step, self.evaluations = 0, 0
            self.untrained: Dict[str, Dict[str, Any]] = {}
            self.input_shape: Optional[list] = None
            self.should_stop = False  # a callback sets it: the run ends after the current step
            self.stop_reason: Optional[StopReason] = None
            self.final_test = False  # true while the selected checkpoint is tested (see callbacks)
            self.last_result = None  # EvalResult of the latest test evaluation (the selected one after fit)
            self.summary: Dict[str, Any] = {}
            self.budget_plan = None  # what train.time_budget came to (engine.budget.Plan)
            self.fold_length = None  # what train.length_folds chose (engine.folds.FoldLength)
            #: a fold run of train.fold_retrieval: {step: validation eval.metric of the pooled features}
            self.pooled_curve: Optional[Dict[int, float]] = None
            self.recorder = Recorder()
            self.callbacks: List[Callback] = []  # rank 0 alone calls them, as it alone writes
            if self.is_main:
                self.callbacks = [self.recorder, *([LogRecords(on_log)] if on_log is not None else []), *callbacks]
                if self.cfg.tracking.mlflow is not None:
                    from .tracking import MLflowCallback

                    self.callbacks.append(MLflowCallback.from_config(self.cfg.tracking.mlflow, self.cfg))
            if resume:
                self._restore()

    def rebuild(self, cfg: Config) -> None:
        """Build the run's parts, schedule, moving average and selection again for ``cfg``, as
        ``__init__`` builds them (the same seed: the same initial weights and batches), before the first
        step: ``train.fold_candidates`` chose another recipe than the one built, or ``train.fold_members``
        an ensemble (``model.members``)."""
        if self.step or self.resume:
            raise RuntimeError("Trainer.rebuild: only before the first step of a new run")
        self.cfg = mark_python_objects(resolve_paths(cfg), None, None)
        del self.parts
        gc.collect()
        self._build()

    def _build(self, **objects: Any) -> None:
        """The run's parts for ``self.cfg`` (seeded first: the same config gives the same initial
        weights and batches; ``objects``: :func:`~.parts.build_training`'s), and what is made from
        them: the schedule, the moving average (``train.ema``: what the run evaluates, selects and
        saves; any other hook is kept) and the selection."""
        seed_everything(self.cfg.seed)
        self.parts = build_training(self.cfg, self.device, self.dist, **objects)
        self.schedule = LRSchedule(self.cfg.scheduler, [self.optimizers["main"]], self.cfg.train.max_steps)
        kept = [h for h in getattr(self, "hooks", []) if not isinstance(h, MovingAverage)]
        self.hooks: List[TrainingHook] = ([MovingAverage(self.model, self.cfg.train.ema)] if self.cfg.train.ema
                                          else []) + kept
        self.selection = selection_for(self.cfg, self.val_evaluator is not None)

    def __getattr__(self, name: str) -> Any:
        if name in _PARTS and "parts" in self.__dict__:
            return getattr(self.parts, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # the run as callbacks and the CLI see it
    is_main = property(lambda self: self.dist.is_main)
    history = property(lambda self: self.recorder.history)
    sampler = property(lambda self: self.parts.batches.sampler, lambda self, v: setattr(self.parts.batches, "sampler", v))
    loader = property(lambda self: self.parts.batches.loader, lambda self, v: setattr(self.parts.batches, "loader", v))
    batch_plan = property(lambda self: self.parts.batches.plan)
    batch_affine = property(lambda self: self.parts.batches.affine)
    batch_normalize = property(lambda self: self.parts.batches.normalize)
    loader_settings = property(lambda self: self.parts.batches.settings)
    best_value = property(lambda self: self.selection.record.best_value)
    best_step = property(lambda self: self.selection.record.best_step)
    best_val = property(lambda self: self.selection.record.best_val)

    @property
    def ema(self):
        """``train.ema``'s :class:`~.averaging.WeightAverage` (None without it)."""
        return next((h.average for h in self.hooks if isinstance(h, MovingAverage)), None)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights a run evaluates, selects and saves as ``model.safetensors``: a hook's (the moving
        average under ``train.ema``), else the live model."""
        for hook in self.hooks:
            if hook.evaluated() is not None:
                return hook.evaluated()
        return self.model

    def notify(self, event: str, *args: Any) -> None:
        run_callbacks(self.callbacks, event, self, *args)

    def summary_words(self, split: str) -> str:
        return split_sizes(self.splits).get(split) or "none"

    # -- state ---------------------------------------------------------------------------------------
    def _restore(self) -> None:
        ckpt, state = self._checkpoint
        load_model_weights(self.evaluated, ckpt)  # under train.ema the average; the hook restores the live weights
        extra = load_train_state(ckpt, self.losses, self.optimizers, state)
        self.step = state["step"]
        for hook in self.hooks:
            hook.load_extra_state(self, extra, str(ckpt / "train_state.safetensors"))
        self.parts.batches.load_state_dict(state)
        self.selection.load_state_dict(state)
        self.evaluations = state.get("evaluations", 0)
        self.untrained = state.get("untrained") or {}
        self.input_shape = state.get("input_shape")
        check_sources(ckpt, state.get("sources"), self.sources)
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("grad_scaler"):  # fp16: the loss scale it had reached
            self.scaler.load_state_dict(state["grad_scaler"])
        log.info("resumed %s at step %d", ckpt, self.step)

    def _save(self, name: str, metrics: Dict[str, Any]) -> None:
        if not self.is_main:
            barrier()
            return
        state = {"step": self.step, **self.parts.batches.state_dict(), **self.selection.state_dict(),
                 "evaluations": self.evaluations, "metric": self.cfg.eval.metric, "metrics": metrics,
                 "untrained": self.untrained, "input_shape": self.input_shape, "sources": self.sources,
                 "scheduler": self.schedule.state_dict(),
                 "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        extra = {k: v for hook in self.hooks for k, v in hook.extra_state(self).items()}
        save_checkpoint(self.run_dir / "checkpoints" / name, cfg=self.cfg, model=self.evaluated,
                        losses=self.losses, optimizers=self.optimizers, state=state, extra=extra)
        barrier()
        self.notify("on_checkpoint", name, self.run_dir / "checkpoints" / name)

    # -- a step --------------------------------------------------------------------------------------
    def _batches(self):
        return iter(self.parts.batches)

    def calibration_batches(self):
        """Batches drawn like the run's, from a sampler and generator of their own (seeded apart), so
        that drawing them leaves the run's batches as they were (``train.time_budget`` measures steps)."""
        return iter(Batches(self.cfg, self.splits, self.device, self.dist, self.channels_last, seed=self.cfg.seed + 7919,
                            cache=self.parts.cache))

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step (:mod:`.step`), then the hooks."""
        self.schedule.apply(self.step)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss = batch_loss(self.parts, self.cfg, images, labels, embeddings_only=self.sources["model"] == "python",
                          distributed=self.dist.is_distributed, step=self.step)
        update(self.parts, self.cfg, loss, self.step)
        self.step += 1
        for hook in self.hooks:
            hook.after_step(self)
        if self.step == self.cfg.train.freeze_backbone_steps:
            log.info("step %d: the backbone trains from now on (train.freeze_backbone_steps)", self.step)
        return loss.detach()

    # -- a run ---------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train, select, test the selected checkpoint once; returns the summary (also written to
        ``metrics.json``; see :func:`deepmetric.viz.summary.format_summary`)."""
        created = not self.run_dir.exists()
        then = f"; free space (or fix the folder), then continue with `deepmetric train --resume {self.run_dir}`"
        threads = torch.get_num_threads()  # train.threads sets them for the run only
        try:
            with collect_notes(self.notes), writing(self.run_dir, "run directory", then):
                if self.is_main:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                barrier()
                return self._fit()
        except BaseException as exc:
            report_fit_error(self.callbacks, self, exc)
            # Nothing half-made may pass for a run: remove a fresh run dir that never got a checkpoint.
            if self.is_main and created and not self.resume and not (self.run_dir / "checkpoints").exists():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(threads)

    def _fit(self) -> Dict[str, Any]:
        if self.cfg.train.length_folds and not self.resume:  # how long to train, chosen on folds first
            if self.dist.is_distributed:
                raise ConfigError("train.length_folds runs in one process; choose the length there (or set "
                                  "train.max_steps) and launch that with torchrun")
            from .folds import run_folds

            self.fold_length = run_folds(self)  # the fold runs set their own threads
        if self.cfg.train.threads:  # the recipe's, or the count the folds' time budget kept
            torch.set_num_threads(self.cfg.train.threads)
        untrained = fit_to_budget(self, budget.CLOCK()) if budget_seconds(self.cfg) and not self.resume else {}
        if self.is_main and not self.resume:
            save_config(self.cfg, self.run_dir / "config.yaml")
            atomic_write(self.run_dir / "splits.json", json.dumps(
                {"source": self.sources["splits"], **describe_splits(self.splits)}, indent=1))
        if self.val_evaluator is None and self.fold_length is None:
            log.warning("no validation split (data.val_classes): the last step is reported, not selected")
        show = self.cfg.train.progress and self.is_main
        on_terminal = sys.stderr.isatty()
        if show and not on_terminal:  # off a terminal the bar is off: log lines instead
            self.callbacks.insert(1, ProgressLog(self.cfg.train.max_steps, self.step))
        self.notify("on_fit_start")
        if not self.resume and self.cfg.eval.untrained:
            for split in (("val",) if self.val_evaluator is not None else ()) + ("test",):
                self.untrained[split] = (self._notified(split, untrained[split]) if split in untrained
                                         else self.evaluate(split).metrics)
        from tqdm.auto import tqdm

        with tqdm(total=self.cfg.train.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                  disable=not (show and on_terminal)) as bar:  # closed before the final test
            self._train_loop(bar)
        summary = self._final(announce=show)
        self.notify("on_fit_end", summary)
        return summary

    def _notified(self, split: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
        self.notify("on_evaluation", split, metrics)
        return metrics

    def _train_loop(self, bar) -> None:
        train = self.cfg.train
        self.model.train()
        self.losses.train()
        running, seen, busy, t0 = None, 0, 0.0, time.perf_counter()  # busy: this log window's steps, evaluations excluded
        batches = self._batches()
        with StopRequest() as stop:  # Ctrl-C / SIGTERM: finish the step, save, stop
            while self.step < train.max_steps and self.stop_reason is None:
                if ranks_agree(self.dist, stop.requested, due=self.step % train.log_every == 0):
                    self._stop_here()
                try:
                    images, labels, _ = next(batches)
                except Exception:
                    if stop.requested:  # Ctrl-C also reaches loader workers, which then die
                        self._stop_here()
                    raise
                self.input_shape = self.input_shape or list(images.shape[1:])  # what inference resizes to
                loss = self.train_step(images, labels)
                running, seen = loss if running is None else running + loss, seen + images.shape[0]
                bar.update(1)
                rec = {"step": self.step, "epoch": self.parts.batches.epoch}
                if self.step % train.log_every == 0 or self.step == train.max_steps:
                    rec = self._log_row(running, seen, busy + time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['images_per_s']:.0f}")
                    running, seen, busy, t0 = None, 0, 0.0, time.perf_counter()
                self.notify("on_step_end", rec)
                last = self.step == train.max_steps or self.callback_stop()
                if (train.eval_every and self.step % train.eval_every == 0) or last:
                    busy += time.perf_counter() - t0
                    self._evaluate_and_checkpoint(final=last)
                    t0 = time.perf_counter()
                elif train.checkpoint_every and self.step % train.checkpoint_every == 0:
                    self._save("last", {})

    def _log_row(self, running: torch.Tensor, seen: int, seconds: float) -> Dict[str, Any]:
        """The ``metrics.jsonl`` row of a logging step: the mean loss since the last one, lr, speed."""
        value = float(running) / ((self.step - 1) % self.cfg.train.log_every + 1)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {self.step}; lower optimizer.lr "
                                     f"or enable train.grad_clip")
        return {"step": self.step, "loss": value, "lr": self.optimizers["main"].param_groups[0]["lr"],
                "images_per_s": seen / max(seconds, 1e-9), "epoch": self.parts.batches.epoch}

    def stop(self, reason: StopReason) -> None:
        self.stop_reason = self.stop_reason or reason

    def callback_stop(self, sync: bool = False) -> bool:
        """Whether a callback has set ``should_stop`` (the ranks agree at logging steps, or now with
        ``sync``: an evaluation already synchronises them); the run then ends after this step."""
        if self.stop_reason is StopReason.CALLBACK:
            return True
        due = sync or self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.max_steps
        if not ranks_agree(self.dist, self.should_stop, due):
            return False
        self.stop(StopReason.CALLBACK)
        self.notes.append(f"stopped at step {self.step} by a callback (trainer.should_stop)")
        log.info("step %d: a callback stopped the run (trainer.should_stop)", self.step)
        return True

    def _stop_here(self) -> None:
        """Save ``last`` at this step boundary and leave as an interrupt (the CLI exits with 130)."""
        self.stop(StopReason.SIGNAL)
        self._save("last", {})
        log.warning("stopped at step %d; saved %s: continue with `deepmetric train --resume %s`",
                    self.step, self.run_dir / "checkpoints" / "last", self.run_dir)
        raise KeyboardInterrupt

    # -- evaluation and selection ----------------------------------------------------------------------
    def evaluate(self, split: str, neighbours: bool = False, record: bool = True, notify: bool = True):
        """Evaluate the evaluated weights on ``split`` (``"val"`` or ``"test"``) and, with ``notify`` (the
        :class:`~.run_log.Recorder` among them, unless ``record`` is off), tell the callbacks. The
        metrics' warnings (skipped queries) become notes of the run and are warned again."""
        evaluator = self.val_evaluator if split == "val" else self.evaluator
        model = self.evaluated
        if self.channels_last and model is self.model:  # NCHW, as deepmetric eval runs the checkpoint
            model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        with warnings_as_notes(self.notes, f"step {self.step}, {split}"):
            result = evaluator.run(model, neighbours=neighbours)
            if split == "val" and self.pooled_curve is not None:  # a fold run of train.fold_retrieval
                with retrieval_as(model, "pooled"):
                    pooled = evaluator.run(model, neighbours=False).metrics[self.cfg.eval.metric]
                self.pooled_curve[self.step] = float(pooled)
        result.metrics = broadcast_object(result.metrics)
        self.model.train()
        if notify:
            callbacks = self.callbacks if record else [c for c in self.callbacks if c is not self.recorder]
            run_callbacks(callbacks, "on_evaluation", self, split, result.metrics)
        return result

    def _evaluate_and_checkpoint(self, final: bool = False) -> None:
        """A periodic evaluation (``final``: the run's last step), by the run's selection, and its
        checkpoints: ``last``, and ``best`` when the selection says so."""
        self.evaluations += 1
        metrics, best = self.selection.evaluate(self, final)
        self._save("last", metrics)
        if best:
            self._save("best", metrics)

    def _final(self, announce: bool = False) -> Dict[str, Any]:
        """Test the selected checkpoint once; write ``metrics.json``; return the summary.
        ``announce``: log the phase (it may take a while)."""
        selected = self.best_step if self.best_step is not None else self.step
        if announce:
            log.info("evaluating the selected checkpoint (step %d) on the test split", selected)
        self.final_test = True
        self.last_result = result = self.selection.final_result(self)
        self.final_test = False
        self.summary = summary = run_summary(self, result, selected)
        if self.is_main:
            flat = {"checkpoint": summary["checkpoint"], "step": selected, **result.metrics,
                    **{k: v for k, v in summary.items() if k not in ("checkpoint", "step", "metrics")}}
            atomic_write(self.run_dir / "metrics.json", json.dumps(flat, indent=1))
        return {"run_dir": str(self.run_dir), **summary, "best": {self.cfg.eval.metric: self.best_value}}
