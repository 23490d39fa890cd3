"""One optimizer step of a run: the loss of a batch and the update, on the parts of :mod:`.parts`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import Config
from ..core.distributed import all_gather_with_grad
from ..data.transforms import SMALL_AFFINE
from .build import own_optimizer_key
from .parts import TrainingParts


def second_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``images`` (a normalised ``(B, C, H, W)`` batch), each under a random affine drawn from
    ``generator`` on the CPU (the ``tensor_augment`` preset's ranges, :data:`~deepmetric.data.transforms.
    SMALL_AFFINE`: rotation up to 10 degrees, shift up to 10% of the side, scale 0.9-1.1), bilinear, the
    border pixels extended outwards."""
    if images.ndim != 4:
        raise ValueError(f"an instance term (losses.N.labels: instance) warps image batches (B, C, H, W); this "
                         f"model's inputs have shape {tuple(images.shape)}")
    b = images.shape[0]
    r = torch.rand(b, 5, generator=generator, dtype=torch.float64)
    low, high = SMALL_AFFINE["scale"]
    angle = (r[:, 0] * 2 - 1) * math.radians(SMALL_AFFINE["degrees"])
    scale = low + (high - low) * r[:, 1]
    shift = (r[:, 2:4] * 2 - 1) * 2 * SMALL_AFFINE["translate"]  # a share of the side, in affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = images.float()
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, padding_mode="border", align_corners=False).to(images.dtype)
    if images.is_contiguous(memory_format=torch.channels_last):
        view = view.contiguous(memory_format=torch.channels_last)
    return view


def batch_loss(parts: TrainingParts, cfg: Config, images: torch.Tensor, labels: torch.Tensor, *,
               embeddings_only: bool, distributed: bool, step: int = 0) -> torch.Tensor:
    """The weighted sum of the recipe's loss terms on a batch, under ``train.amp``. Under DDP every
    rank computes the full loss on the global batch (all-gathered with their gradients), except for
    terms that shard classes and gather themselves (Partial FC) and instance terms (``labels:
    instance``: each rank's own images and their :func:`second_view`, drawn from the seed, the rank and
    ``step``). ``embeddings_only``: a model of one's own, which gives embeddings only. An
    :class:`~deepmetric.models.Ensemble` (``model.members``) gives each member's outputs: every term
    is taken on each member's own and summed over them, so each member trains as it would alone."""
    with torch.autocast(images.device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        local = {"embedding": parts.net(images)} if embeddings_only else parts.net(images, all_outputs=True)
        members = local.get("members")
        views = None
        if any(term.labels == "instance" for term in cfg.losses):  # each image its own class: a second view
            rank = torch.distributed.get_rank() if distributed else 0
            view = second_view(images, torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + rank))
            second = {"embedding": parts.net(view)} if embeddings_only else parts.net(view, all_outputs=True)
            views = second.get("members") or [second]
        total = images.new_zeros((), dtype=torch.float32)
        for m, own in enumerate(members or [local]):
            total = total + _terms(parts, cfg, own, labels, None if views is None else views[m], distributed)
    return total


def _terms(parts: TrainingParts, cfg: Config, local, labels: torch.Tensor, second, distributed: bool) -> torch.Tensor:
    """The weighted loss terms on one network's outputs ``local`` (and ``second``: those of the batch's
    second view, for instance terms)."""
    out, all_labels = local, labels
    if distributed:
        all_labels = all_gather_with_grad(labels)
        out = {k: all_gather_with_grad(v) for k, v in local.items()}
    total = labels.new_zeros((), dtype=torch.float32)
    for term, fn in zip(cfg.losses, parts.losses):
        if term.labels == "instance":
            n = local[term.input].shape[0]
            ids = torch.arange(n, device=labels.device).repeat(2)
            total = total + term.weight * fn(torch.cat([local[term.input], second[term.input]]), ids)
        elif getattr(fn, "gathers_inputs", False):  # Partial FC shards classes and gathers itself
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
        model = parts.model  # an Ensemble's members' backbones; a model given in Python says its .backbone
        for p in (model.backbone_parameters() if hasattr(model, "backbone_parameters") else model.backbone.parameters()):
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
