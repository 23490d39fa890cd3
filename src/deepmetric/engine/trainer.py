"""The training loop: composes data, model, losses and optimizers built from a Config.

``Trainer(cfg, run_dir).fit()`` trains for ``train.max_steps`` steps, evaluates every
``train.eval_every`` steps (and at the end) with the same :class:`~deepmetric.engine.evaluator.Evaluator`
that ``deepmetric eval`` uses, writes ``metrics.jsonl`` and TensorBoard events, and keeps ``best``
and ``last`` checkpoints. ``Trainer(cfg, run_dir, resume=True)`` continues from ``last`` exactly: the
same batches, the same random numbers, the same augmented pixels (each sample is augmented under a
seed of its own, whatever ``data.num_workers`` is: see :mod:`deepmetric.data.loading`). Under
``train.ema`` a moving average of the weights (:mod:`~deepmetric.engine.averaging`) is what the run
evaluates, selects and saves as the checkpoints' weights, while the live weights train.

Under ``torchrun`` the same code runs DistributedDataParallel (NCCL on GPUs, gloo on CPU): the batch
sampler (``data.sampler``: P x K or random) shards batches by rank; every loss sees all ranks'
embeddings through a gradient-preserving all-gather and every rank computes the same full loss, so
(with DDP's gradient averaging and the gather's gradient sum, see :mod:`deepmetric.core.distributed`)
the update equals one process training on the global batch. Cross-batch memories therefore enqueue
the same global batch in the same order on every rank. Rank 0 alone writes logs and checkpoints;
evaluation embeds a shard per rank, gathers the embeddings and computes exact metrics once.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError, load_config, resolve_recipe, save_config
from ..core.distributed import all_gather_with_grad, any_rank, barrier, broadcast_object, init_distributed, rank_device
from ..core.files import atomic_write, check_writable, writing
from ..data.base import DataSplits
from ..data.loading import SeededBatchSampler, SeededDataset, affine_on_batch, loader_settings
from ..data.protocol import describe_splits
from .build import (apply_protocol, build_data, build_device_normalisation, build_losses, build_model, build_optimizers,
                    build_sampler, channels_last, check_pairs, check_training_set, own_optimizer_key, resolve_paths, seed_everything)
from .callbacks import Callback, LogRecords, ProgressLog, report_fit_error, run_callbacks
from .averaging import WeightAverage
from . import budget
from .budget import budget_seconds, measure_steps, plan_steps
from .checkpoint import load_model_weights, load_train_state, read_checkpoint, resolve_checkpoint, save_checkpoint
from .evaluator import Evaluator
from .interrupt import StopRequest
from .python_objects import check_sources, embedding_dim, mark_python_objects, object_sources, with_training_set
from .run_log import collect_notes, split_sizes, tensorboard_writer, truncate_log
from .schedule import LRSchedule
from .selection import Selection

log = logging.getLogger("deepmetric")


class Trainer:
    """Train one recipe into ``run_dir``. See the module docstring.

    ``cfg``: a :class:`~deepmetric.config.Config`, or a path: your images (a folder with a subfolder
    per class, or a list file: the automatic recipe of :func:`deepmetric.auto_config`, whose
    ``key=value`` overrides that function takes) or a recipe (a YAML file, a run directory or a
    packaged recipe's name).

    Objects of your own replace the recipe's parts: ``model`` (any ``nn.Module`` mapping images
    ``(B, C, H, W)`` to embeddings ``(B, D)``; ``model.*`` keys are then unused), ``loss`` (any
    ``nn.Module`` called as ``loss(embeddings, labels)`` -> scalar; its parameters join the main
    optimizer; it replaces ``losses``), ``splits`` (a :class:`~deepmetric.data.DataSplits`) or
    ``train_dataset`` (a torch ``Dataset`` of ``(image, label)`` or ``(image, label, index)``; the
    evaluation splits stay the recipe's, or those of ``splits``; see
    :mod:`~deepmetric.engine.python_objects`). Checkpoints hold their weights like
    any others: resume by passing the same objects again. ``config.yaml`` names them
    ``python:<class>`` and ``state.json`` / the summary record ``sources``; ``deepmetric eval`` (and
    every command that loads a run) cannot rebuild such a model and says how to evaluate it in Python
    (:func:`~deepmetric.engine.build.python_model_error`).
    ``callbacks``: :class:`~deepmetric.engine.callbacks.Callback` s; ``on_log(row)`` is called with
    each ``metrics.jsonl`` row.
    """

    def __init__(self, cfg: Config | str | Path, run_dir: str | Path, resume: bool = False,
                 splits: Optional[DataSplits] = None, on_log: Optional[Callable[[Dict[str, Any]], None]] = None,
                 *, callbacks: Sequence[Callback] = (), model: Optional[torch.nn.Module] = None,
                 loss: Optional[torch.nn.Module] = None, train_dataset: Optional[torch.utils.data.Dataset] = None) -> None:
        self.notes: List[str] = []  # the run's facts and warnings, also in the summary
        if not isinstance(cfg, Config):  # your images (a folder or a list: the automatic recipe), or a recipe
            from .auto import auto_config, is_data_path

            if is_data_path(cfg):
                auto = auto_config(cfg)
                cfg = auto.config
                self.notes.extend(auto.notes)
            else:
                cfg = load_config(resolve_recipe(cfg))
        with collect_notes(self.notes):
            self._build(cfg, run_dir, resume, splits, on_log, callbacks, model, loss, train_dataset)

    def _build(self, cfg, run_dir, resume, splits, on_log, callbacks, model, loss, train_dataset) -> None:
        cfg = resolve_paths(cfg)
        self.sources = object_sources(model, loss, splits, train_dataset)
        self.cfg = cfg = mark_python_objects(cfg, model, loss)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.should_stop = False  # a callback sets it: the run ends after the current step
        self.final_test = False  # true while the selected checkpoint is tested (see callbacks)
        self.dist = init_distributed()
        self.callbacks: List[Callback] = []  # rank 0 alone calls them, as it alone writes
        if self.dist.is_main:
            self.callbacks = [*([LogRecords(on_log)] if on_log is not None else []), *callbacks]
        self.device = rank_device(cfg.train.device, self.dist)
        self.is_main = self.dist.is_main
        check_writable(self.run_dir, "run directory", folder=True)
        if not resume and (self.run_dir / "checkpoints").exists():
            raise ConfigError(f"run directory {self.run_dir} already holds checkpoints; "
                              f"continue it with --resume or choose another --run-dir")
        if resume:
            self._ckpt, self._state = read_checkpoint(self.run_dir, prefer="last")
        seed_everything(cfg.seed)
        # Everything that can fail on bad input is built before the run directory is touched.
        self.splits_source = self.sources["splits"]
        if train_dataset is not None:
            splits = with_training_set(splits, train_dataset, cfg)
        elif splits is None:
            splits = build_data(cfg)
        else:  # a user's own splits are taken as given; the recipe's validation split is carved from them
            splits = apply_protocol(splits, cfg, getattr(splits.query, "transform", None), class_split=False)
        self.splits = check_training_set(splits, cfg)
        if model is None:
            self.model = build_model(cfg, load_weights=not resume).to(self.device)
            if cfg.model.init_from and not resume:
                self.notes.append(f"model.init_from: the model started from {resolve_checkpoint(cfg.model.init_from)}")
        else:
            self.model = model.to(self.device)
        dim = embedding_dim(self.model, self.splits, self.device)
        if loss is None:
            self.losses = build_losses(cfg, self.splits.num_classes, dim).to(self.device)
        else:
            self.losses = torch.nn.ModuleList([loss]).to(self.device)
        check_pairs(cfg, self.losses)
        self.optimizers = build_optimizers(cfg, self.model, self.losses)
        # a loss term's own optimizer (Centroids-ReID's centre loss) keeps its fixed lr, as in the seed
        self.schedule = LRSchedule(cfg.scheduler, [self.optimizers["main"]], cfg.train.max_steps)
        self.sampler = build_sampler(cfg, self.splits.train.labels, self.dist.rank, self.dist.world_size)
        self.loader_generator = torch.Generator().manual_seed(cfg.seed)
        # every sample is augmented under its own seed: the same pixels with any number of workers
        self.batch_plan = SeededBatchSampler(self.sampler, cfg.seed, self.dist.rank, self.dist.world_size)
        self.loader_settings = loader_settings(cfg.data.num_workers, cfg.data.pin_memory, self.device,
                                               local_world_size=self.dist.local_world_size)
        # uint8 images from the workers, normalised on the device (CUDA by default)
        train_view, self.batch_normalize = build_device_normalisation(cfg, self.splits.train, self.device)
        # a random affine draws per image and warps per batch (the same pixels, a fraction of the time)
        train_view, self.batch_affine = affine_on_batch(train_view)
        self._train_view = train_view
        self.loader = DataLoader(SeededDataset(train_view), batch_sampler=self.batch_plan,
                                 generator=self.loader_generator, **self.loader_settings.kwargs())
        self.evaluator = Evaluator(cfg, self.splits, self.device)  # the test split
        self.val_evaluator = None if self.splits.val is None else Evaluator(cfg, self.splits.val, self.device)
        self._check_selection()
        amp = cfg.train.amp
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.channels_last = channels_last(cfg.train.channels_last, self.device, self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # train.ema: the moving average that is evaluated, selected and saved (None: the live weights)
        self.ema = WeightAverage(self.model, cfg.train.ema) if cfg.train.ema else None
        self.net: torch.nn.Module = self.model
        if self.dist.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.net = torch.compile(self.net)
        self.step = 0
        self.epoch = 0
        self.position = 0  # batches consumed in the current epoch
        self.selection = Selection()  # model selection, on the validation split only
        self.evaluations = 0
        self.untrained: Dict[str, Dict[str, Any]] = {}
        self.input_shape: Optional[list] = None
        self.stopped_early = False
        self.stopped_by_callback = False
        self.history: list[Dict[str, Any]] = []
        self.last_result = None  # EvalResult of the latest test evaluation (the selected one after fit)
        self._final_test = None
        self.summary: Dict[str, Any] = {}
        self.budget_plan = None  # what train.time_budget came to (engine.budget.Plan)
        if resume:
            self._restore()
        if cfg.tracking.mlflow is not None and self.is_main:
            from .tracking import MLflowCallback

            self.callbacks.append(MLflowCallback.from_config(cfg.tracking.mlflow, cfg))

    def _check_selection(self) -> None:
        """Selection settings that cannot work, refused before the first step."""
        cfg = self.cfg
        (self.val_evaluator or self.evaluator).check_metric(cfg.eval.metric)
        if self.val_evaluator is None:
            for bad, key in ((cfg.scheduler.name == "plateau", "scheduler.name=plateau"),
                             (cfg.train.early_stopping > 0, "train.early_stopping")):
                if bad:
                    raise ConfigError(f"{key} follows the validation metric, and there is no validation split: "
                                      f"set data.val_classes (e.g. 0.1), never select on the test classes")

    # -- state ---------------------------------------------------------------------------------------
    def _restore(self) -> None:
        # under train.ema model.safetensors holds the average; the live weights continue training
        load_model_weights(self.evaluated, self._ckpt)
        load_train_state(self._ckpt, self.losses, self.optimizers, self._state,
                         live=None if self.ema is None else self.model)
        s = self._state
        self.step, self.epoch, self.position = s["step"], s["epoch"], s["position"]
        if self.ema is not None:
            self.ema.updates = self.step  # one update per step
        self.selection.load_state_dict(s)
        self.evaluations = s.get("evaluations", 0)
        self.untrained = s.get("untrained") or {}
        self.input_shape = s.get("input_shape")
        check_sources(self._ckpt, s.get("sources"), self.sources)
        self.schedule.load_state_dict(s["scheduler"])
        self.loader_generator.set_state(torch.tensor(s["loader_generator"], dtype=torch.uint8))
        if self.scaler.is_enabled() and s.get("grad_scaler"):  # fp16: the loss scale it had reached
            self.scaler.load_state_dict(s["grad_scaler"])
        log.info("resumed %s at step %d", self._ckpt, self.step)

    def _save(self, name: str, metrics: Dict[str, Any]) -> None:
        if not self.is_main:
            barrier()
            return
        state = {"step": self.step, "epoch": self.epoch, "position": self.position,
                 **self.selection.state_dict(), "evaluations": self.evaluations,
                 "metric": self.cfg.eval.metric, "metrics": metrics, "untrained": self.untrained,
                 "input_shape": self.input_shape, "sources": self.sources,
                 "scheduler": self.schedule.state_dict(),
                 "loader_generator": self.loader_generator.get_state().tolist(),
                 "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        save_checkpoint(self.run_dir / "checkpoints" / name, cfg=self.cfg, model=self.evaluated,
                        losses=self.losses, optimizers=self.optimizers, state=state,
                        live=None if self.ema is None else self.model)
        barrier()
        run_callbacks(self.callbacks, "on_checkpoint", self, name, self.run_dir / "checkpoints" / name)

    # -- loop ----------------------------------------------------------------------------------------
    def _batches(self):
        """``(images, labels, indices)`` batches as the model takes them: on the device, warped
        (:attr:`batch_affine`), normalised (:attr:`batch_normalize`), in NHWC order under :attr:`channels_last`."""
        while True:
            self.batch_plan.set_epoch(self.epoch)
            self.batch_plan.skip(self.position)
            for images, labels, indices in self.loader:
                self.position += 1
                yield self._on_device(images), labels.to(self.device, non_blocking=True), indices
            self.epoch += 1
            self.position = 0

    def calibration_batches(self):
        """Batches like :meth:`_batches`, from a sampler and generator of their own (seeded apart), so
        drawing them leaves the run's batches as they were (``train.time_budget`` measures steps on them)."""
        sampler = build_sampler(self.cfg.model_copy(update={"seed": self.cfg.seed + 7919}),
                                self.splits.train.labels, self.dist.rank, self.dist.world_size)
        plan = SeededBatchSampler(sampler, self.cfg.seed + 7919, self.dist.rank, self.dist.world_size)
        loader = DataLoader(SeededDataset(self._train_view), batch_sampler=plan,
                            generator=torch.Generator().manual_seed(self.cfg.seed + 7919),
                            **self.loader_settings.kwargs())
        while True:
            for images, labels, indices in loader:
                yield self._on_device(images), labels.to(self.device, non_blocking=True), indices
            plan.set_epoch(plan.epoch + 1)

    def _on_device(self, images):
        if isinstance(images, (list, tuple)):  # (images, theta) from the view affine_on_batch made
            images, theta = images
            images = self.batch_affine(images.to(self.device, non_blocking=True), theta)
        else:
            images = images.to(self.device, non_blocking=True)
        if self.batch_normalize is not None:
            images = self.batch_normalize(images)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.sources["model"] == "python":  # a model of one's own gives embeddings only
                local = {"embedding": self.net(images)}
            else:
                local = self.net(images, all_outputs=True)
            out, all_labels = local, labels
            if self.dist.is_distributed:  # every rank computes the full loss on the global batch
                all_labels = all_gather_with_grad(labels)
                out = {k: all_gather_with_grad(v) for k, v in local.items()}
            total = images.new_zeros((), dtype=torch.float32)
            for term, fn in zip(self.cfg.losses, self.losses):
                if getattr(fn, "gathers_inputs", False):  # Partial FC shards classes and gathers itself
                    total = total + term.weight * fn(local[term.input], labels)
                else:
                    total = total + term.weight * fn(out[term.input], all_labels)
        return total

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step. Order: backward; drop the backbone's gradients while
        ``train.freeze_backbone_steps`` lasts (a parameter without a gradient is skipped by every
        optimizer: no update, no weight decay, no momentum); unweight the gradients of a loss term's
        own optimizer; unscale (fp16) and clip (``grad_clip`` by norm on the model,
        ``grad_clip_value`` entrywise on every trained parameter); step."""
        train = self.cfg.train
        self.schedule.apply(self.step)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss = self._loss(images, labels)
        self.scaler.scale(loss).backward()
        if self.step < train.freeze_backbone_steps:
            for p in self.model.backbone.parameters():
                p.grad = None
        for i, term in enumerate(self.cfg.losses):  # a term's own optimizer sees the unweighted gradient
            opt = self.optimizers.get(own_optimizer_key(i))  # (Centroids-ReID)
            if opt is not None and term.weight:
                for g in opt.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.div_(term.weight)
        if train.grad_clip or train.grad_clip_value:
            for key, opt in self.optimizers.items():  # clip true gradients, not fp16-scaled ones
                if key == "main" or train.grad_clip_value:
                    self.scaler.unscale_(opt)
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
            if train.grad_clip_value:
                trained = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_value_(trained, train.grad_clip_value)
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        if self.step == train.freeze_backbone_steps:
            log.info("step %d: the backbone trains from now on (train.freeze_backbone_steps)", self.step)
        return loss.detach()

    def fit(self) -> Dict[str, Any]:
        """Train, select on validation, test the selected checkpoint once; returns the summary
        (also written to ``metrics.json``; see :func:`deepmetric.viz.summary.format_summary`)."""
        created = not self.run_dir.exists()
        then = f"; free space (or fix the folder), then continue with `deepmetric train --resume {self.run_dir}`"
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

    def _fit(self) -> Dict[str, Any]:
        started = time.perf_counter()
        untrained = None
        if budget_seconds(self.cfg) is not None and not self.resume:
            untrained = self._fit_to_budget(started)
        cfg = self.cfg
        if self.is_main:
            if self.resume:  # rows written after the checkpoint we continue from would repeat
                truncate_log(self.run_dir / "metrics.jsonl", self.step)
            else:
                save_config(cfg, self.run_dir / "config.yaml")
                atomic_write(self.run_dir / "splits.json", json.dumps(
                    {"source": self.splits_source, **describe_splits(self.splits)}, indent=1))
        writer = tensorboard_writer(self.run_dir, purge_step=self.step + 1 if self.resume else None) if self.is_main else None
        log_file = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        from tqdm.auto import tqdm

        if self.val_evaluator is None:
            log.warning("no validation split (data.val_classes): the last step is reported, not selected")
        show = cfg.train.progress and self.is_main
        on_terminal = sys.stderr.isatty()
        progress = ProgressLog(cfg.train.max_steps, self.step) if show and not on_terminal else None
        if progress is not None:  # off a terminal the bar is off: log lines instead
            self.callbacks.insert(0, progress)
        try:
            if not self.resume and cfg.eval.untrained:
                self._evaluate_untrained(log_file, writer, untrained)
            bar = tqdm(total=cfg.train.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       disable=not (show and on_terminal))
            try:
                self._train_loop(bar, log_file, writer)
            finally:
                bar.close()  # before the final test: a bar must not sit at 100% while it runs
            summary = self._final(log_file, writer, announce=show)
            run_callbacks(self.callbacks, "on_fit_end", self, summary)
            return summary
        finally:
            if log_file is not None:
                log_file.close()
            if writer is not None:
                writer.close()
            if progress is not None:
                self.callbacks.remove(progress)

    def _train_loop(self, bar, log_file, writer) -> None:
        cfg = self.cfg
        self.model.train()
        self.losses.train()
        running, seen, t0 = None, 0, time.perf_counter()
        busy = 0.0  # training time of the current log window before its last evaluation
        batches = self._batches()
        stop = StopRequest().__enter__()  # Ctrl-C / SIGTERM: finish the step, save, stop
        try:
            while self.step < cfg.train.max_steps and not self.stopped_early and not self.stopped_by_callback:
                if self._should_stop(stop):
                    self._stop_here()
                try:
                    images, labels, _ = next(batches)
                except Exception:
                    if stop.requested:  # Ctrl-C also reaches loader workers, which then die
                        self._stop_here()
                    raise
                if self.input_shape is None:  # what inference must resize its inputs to
                    self.input_shape = list(images.shape[1:])
                loss = self.train_step(images, labels)
                running = loss if running is None else running + loss
                seen += images.shape[0]
                bar.update(1)
                rec = {"step": self.step, "epoch": self.epoch}
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    dt = busy + time.perf_counter() - t0  # evaluations excluded
                    n = (self.step - 1) % cfg.train.log_every + 1
                    value = float(running) / n
                    if not math.isfinite(value):
                        raise FloatingPointError(f"loss became {value} at step {self.step}; lower optimizer.lr "
                                                 f"or enable train.grad_clip")
                    rec = {"step": self.step, "loss": value, "lr": self.optimizers["main"].param_groups[0]["lr"],
                           "images_per_s": seen / max(dt, 1e-9), "epoch": self.epoch}
                    self._record(rec, log_file, writer)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['images_per_s']:.0f}")
                    running, seen, t0, busy = None, 0, time.perf_counter(), 0.0
                run_callbacks(self.callbacks, "on_step_end", self, rec)
                last = self.step == cfg.train.max_steps or self._callback_stop()
                eval_now = cfg.train.eval_every and self.step % cfg.train.eval_every == 0
                if eval_now or last:
                    busy += time.perf_counter() - t0
                    self._evaluate_and_checkpoint(log_file, writer, final=last)
                    t0 = time.perf_counter()
                elif cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self._save("last", {})
        finally:
            stop.__exit__()

    def _callback_stop(self, sync: bool = False) -> bool:
        """Whether a callback has set ``should_stop``. Under DDP (callbacks run on rank 0) the ranks
        agree at logging steps, or now with ``sync`` (an evaluation already synchronises them)."""
        if self.stopped_by_callback:
            return True
        requested = self.should_stop
        if self.dist.is_distributed:
            due = sync or self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.max_steps
            requested = bool(due and any_rank(requested))
        if requested:
            self.stopped_by_callback = True
            self.notes.append(f"stopped at step {self.step} by a callback (trainer.should_stop)")
            log.info("step %d: a callback stopped the run (trainer.should_stop)", self.step)
        return requested

    def _should_stop(self, stop: StopRequest) -> bool:
        """A stop was requested (see :mod:`deepmetric.engine.interrupt`). Under DDP the ranks agree
        at logging steps only (an all-reduce forces a device sync: not worth it every step)."""
        if not self.dist.is_distributed:
            return stop.requested
        return self.step % self.cfg.train.log_every == 0 and any_rank(stop.requested)

    def _stop_here(self) -> None:
        """Save ``last`` at this step boundary and leave as an interrupt (the CLI exits with 130)."""
        self._save("last", {})
        log.warning("stopped at step %d; saved %s: continue with `deepmetric train --resume %s`",
                    self.step, self.run_dir / "checkpoints" / "last", self.run_dir)
        raise KeyboardInterrupt

    # -- evaluation and selection ----------------------------------------------------------------------
    def _evaluate(self, split: str, log_file, writer, neighbours: bool = False, record: bool = True,
                  notify: bool = True):
        """Evaluate ``split``; ``record`` it in the logs; ``notify`` the callbacks (or the caller will).
        Warnings of the metrics (skipped queries) become notes of the run and are warned again."""
        evaluator = self.val_evaluator if split == "val" else self.evaluator
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluator.run(self._inference_model(), neighbours=neighbours)
        for w in caught:
            note = f"step {self.step}, {split}: {w.message}"
            if note not in self.notes:
                self.notes.append(note)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        result.metrics = broadcast_object(result.metrics)
        self.model.train()
        if record:
            self._record({"step": self.step, "split": split, "eval": result.metrics}, log_file, writer)
        if notify:
            run_callbacks(self.callbacks, "on_evaluation", self, split, result.metrics)
        return result

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights a run evaluates, selects and saves as ``model.safetensors``: the moving average
        under ``train.ema``, else the live model."""
        return self.model if self.ema is None else self.ema.model

    def _inference_model(self) -> torch.nn.Module:
        """The model as ``deepmetric eval`` and an export run it: in NCHW order (a copy when training
        runs in NHWC), so the run's reported metrics are the ones a later evaluation of its
        checkpoint gives, to the last digit."""
        if self.ema is not None:  # the average is kept in NCHW order
            return self.ema.model
        if not self.channels_last:
            return self.model
        return copy.deepcopy(self.model).to(memory_format=torch.contiguous_format)

    def _evaluate_untrained(self, log_file, writer, done: Optional[Dict[str, Any]] = None) -> None:
        """Step 0: the network before any training, on validation and test (shown beside the trained);
        ``done``: those evaluations already made (:meth:`_fit_to_budget` times them), recorded now."""
        for split in (("val",) if self.val_evaluator is not None else ()) + ("test",):
            if done and split in done:
                metrics = done[split]
                self._record({"step": self.step, "split": split, "eval": metrics}, log_file, writer)
                run_callbacks(self.callbacks, "on_evaluation", self, split, metrics)
            else:
                metrics = self._evaluate(split, log_file, writer).metrics
            self.untrained[split] = metrics

    def measure_budget(self, started: Optional[float] = None, time_test: bool = True):
        """``(plan, untrained)`` for ``train.time_budget``: the untrained evaluations timed (their
        metrics returned, to be recorded) and a few steps measured (:mod:`.budget`), the run itself
        unchanged. ``started``: when the run began (its time counts against the budget)."""
        cfg = self.cfg
        started = budget.CLOCK() if started is None else started
        done: Dict[str, Any] = {}
        timed: Dict[str, float] = {}
        splits = ("val",) if self.val_evaluator is not None else ()
        for split in splits + (("test",) if time_test or not splits else ()):
            t0 = budget.CLOCK()
            result = self._evaluate(split, None, None, record=False, notify=False)
            timed[split] = budget.CLOCK() - t0
            if cfg.eval.untrained:
                done[split] = result.metrics
        step_s = measure_steps(self)
        eval_s = timed["val"] if "val" in timed else timed["test"]
        spent = budget.CLOCK() - started - timed.get("test", 0.0)  # the test evaluations are not training
        if not cfg.eval.untrained and "val" in timed:  # that evaluation was for timing only
            spent -= timed["val"]
        plan = plan_steps(budget_seconds(cfg), spent, step_s, eval_s, timed.get("test", 0.0), cfg.train.eval_every,
                          what=str(cfg.train.time_budget))
        return broadcast_object(plan), done  # every rank trains the steps rank 0 measured

    def _fit_to_budget(self, started: float) -> Dict[str, Any]:
        """``train.time_budget``: set ``train.max_steps`` and ``train.eval_every`` to what fits
        (:meth:`measure_budget`); returns the untrained evaluations made on the way, to be recorded."""
        plan, done = self.measure_budget(started)
        note = plan.describe(str(self.cfg.train.time_budget))
        self.notes.append(note)
        log.info("%s", note)
        self.cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={
            "max_steps": plan.max_steps, "eval_every": plan.eval_every, "time_budget": None})})
        self.schedule = LRSchedule(self.cfg.scheduler, [self.optimizers["main"]], plan.max_steps)
        self.budget_plan = plan
        return done

    def _evaluate_and_checkpoint(self, log_file, writer, final: bool = False) -> None:
        """A periodic evaluation (``final``: the run's last step). With a validation split it alone
        selects ``best`` and drives the plateau schedule and early stopping; the test split is only
        logged (``eval.test_during_training``, or always when there is no validation split) and never
        selects."""
        cfg = self.cfg
        self.evaluations += 1
        improved = False
        if self.val_evaluator is not None:
            metrics = self._evaluate("val", log_file, writer, notify=False).metrics
            value = metrics.get(cfg.eval.metric)
            if not isinstance(value, (int, float)):
                raise ConfigError(f"eval.metric: '{cfg.eval.metric}' was not computed on the validation split "
                                  f"({self.summary_words('val')}); choose one of "
                                  f"{', '.join(k for k, v in metrics.items() if isinstance(v, float))}")
            self.schedule.observe(value)
            improved = self.selection.offer(self.step, value, metrics, self.evaluated)
            run_callbacks(self.callbacks, "on_evaluation", self, "val", metrics)  # with this selection
            final = final or self._callback_stop(sync=True)
            if self.selection.exhausted(cfg.train.early_stopping) and not final:
                self.stopped_early = True
                log.info("step %d: validation %s has not improved for %d evaluations (train.early_stopping); "
                         "stopping", self.step, cfg.eval.metric, self.selection.stale_evaluations)
        else:
            metrics = {}
        if self.val_evaluator is None or cfg.eval.test_during_training:
            # the final step's test evaluation of a run without validation is its reported one
            self.last_result = self._evaluate("test", log_file, writer, neighbours=final and self.val_evaluator is None)
            stopped_here = self.val_evaluator is None and not final and self._callback_stop(sync=True)
            if self.val_evaluator is None:
                self.selection.best_step, metrics = self.step, self.last_result.metrics
                if final:  # the reported evaluation of a run without validation
                    self._final_test = self.last_result
                final = final or stopped_here  # then _final tests this step again, with neighbours
        self._save("last", metrics)
        if improved or (self.val_evaluator is None and final):
            self._save("best", metrics)

    def _final(self, log_file, writer, announce: bool = False) -> Dict[str, Any]:
        """Test the selected checkpoint once (the last step without a validation split); write
        ``metrics.json``; return the summary. ``announce``: log the phase (it may take a while)."""
        cfg = self.cfg
        selected = self.best_step if self.best_step is not None else self.step
        self.final_test = True
        if self._final_test is not None and self.val_evaluator is None:
            result = self._final_test
            run_callbacks(self.callbacks, "on_evaluation", self, "test", result.metrics)
        else:  # with validation; or stopped by a callback, or resumed at max_steps, without
            if announce:
                log.info("evaluating the selected checkpoint (step %d) on the test split", selected)
            if self.val_evaluator is not None and selected != self.step:
                self.selection.load_into(self.evaluated, self.run_dir)
            result = self._evaluate("test", log_file, writer, neighbours=True, record=False)
        self.final_test = False
        self.last_result = result
        summary = {
            "checkpoint": str(self.run_dir / "checkpoints" / "best"),
            "step": selected,
            "last_step": self.step,
            "max_steps": cfg.train.max_steps,
            "selected_by": f"validation {cfg.eval.metric}" if self.val_evaluator is not None else None,
            "evaluations": self.evaluations,
            "stopped_early": self.stopped_early,
            "metrics": result.metrics,
            "val": self.best_val if self.val_evaluator is not None else None,
            "untrained": self.untrained,
            "splits": split_sizes(self.splits),
            "budget": None if self.budget_plan is None else dataclasses.asdict(self.budget_plan),
            "sources": dict(self.sources),
            "notes": self.notes,
        }
        self.summary = summary
        if self.is_main:
            flat = {"checkpoint": summary["checkpoint"], "step": selected, **result.metrics,
                    **{k: v for k, v in summary.items() if k not in ("checkpoint", "step", "metrics")}}
            atomic_write(self.run_dir / "metrics.json", json.dumps(flat, indent=1))
        return {"run_dir": str(self.run_dir), **summary, "best": {cfg.eval.metric: self.best_value}}

    # the selection, as callbacks read it (see :class:`~deepmetric.engine.selection.Selection`)
    @property
    def best_value(self) -> Optional[float]:
        return self.selection.best_value

    @property
    def best_step(self) -> Optional[int]:
        return self.selection.best_step

    @property
    def best_val(self) -> Dict[str, Any]:
        return self.selection.best_val

    def summary_words(self, split: str) -> str:
        return split_sizes(self.splits).get(split) or "none"

    def _record(self, rec: Dict[str, Any], log_file, writer) -> None:
        self.history.append(rec)
        if log_file is None:
            return
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()
        if writer is not None:
            flat = rec.get("eval", rec)
            prefix = f"{rec.get('split', 'eval')}/" if "eval" in rec else "train/"
            for k, v in flat.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(prefix + k, v, rec["step"])
