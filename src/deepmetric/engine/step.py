"""One optimizer step of a run: the loss of a batch and the update, on the parts of :mod:`.parts`."""
from __future__ import annotations

import torch

from ..config import Config
from ..core.distributed import all_gather_with_grad
from .build import own_optimizer_key
from .parts import TrainingParts


def batch_loss(parts: TrainingParts, cfg: Config, images: torch.Tensor, labels: torch.Tensor, *,
               embeddings_only: bool, distributed: bool) -> torch.Tensor:
    """The weighted sum of the recipe's loss terms on a batch, under ``train.amp``. Under DDP every
    rank computes the full loss on the global batch (all-gathered with their gradients), except for
    terms that shard classes and gather themselves (Partial FC). ``embeddings_only``: a model of one's
    own, which gives embeddings only."""
    with torch.autocast(images.device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        local = {"embedding": parts.net(images)} if embeddings_only else parts.net(images, all_outputs=True)
        out, all_labels = local, labels
        if distributed:
            all_labels = all_gather_with_grad(labels)
            out = {k: all_gather_with_grad(v) for k, v in local.items()}
        total = images.new_zeros((), dtype=torch.float32)
        for term, fn in zip(cfg.losses, parts.losses):
            if getattr(fn, "gathers_inputs", False):  # Partial FC shards classes and gathers itself
                total = total + term.weight * fn(local[term.input], labels)
            else:
                total = total + term.weight * fn(out[term.input], all_labels)
    return total


def update(parts: TrainingParts, cfg: Config, loss: torch.Tensor, step: int) -> None:
    """Backward and step. Order: backward; drop the backbone's gradients while
    ``train.freeze_backbone_steps`` lasts (a parameter without a gradient is skipped by every
    optimizer: no update, no weight decay, no momentum); unweight the gradients of a loss term's own
    optimizer; unscale (fp16) and clip (``grad_clip`` by norm on the model, ``grad_clip_value``
    entrywise on every trained parameter); step."""
    train, scaler = cfg.train, parts.scaler
    scaler.scale(loss).backward()
    if step < train.freeze_backbone_steps:
        for p in parts.model.backbone.parameters():
            p.grad = None
    for i, term in enumerate(cfg.losses):  # a term's own optimizer sees the unweighted gradient
        opt = parts.optimizers.get(own_optimizer_key(i))  # (Centroids-ReID)
        if opt is not None and term.weight:
            for g in opt.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.div_(term.weight)
    if train.grad_clip or train.grad_clip_value:
        for key, opt in parts.optimizers.items():  # clip true gradients, not fp16-scaled ones
            if key == "main" or train.grad_clip_value:
                scaler.unscale_(opt)
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), train.grad_clip)
        if train.grad_clip_value:
            trained = [p for opt in parts.optimizers.values() for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_value_(trained, train.grad_clip_value)
    for opt in parts.optimizers.values():
        scaler.step(opt)
    scaler.update()
