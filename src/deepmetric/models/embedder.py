"""The model: ``Embedder = backbone ► head``, and loading of pretrained weights from local files."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .backbones import backbone_state_prefix
from .heads import EmbeddingHead

log = logging.getLogger("deepmetric")


class Embedder(nn.Module):
    """Images ``(B, C, H, W)`` float in, embeddings ``(B, D)`` out.

    ``forward(x)`` returns the retrieval embedding (what search, evaluation and ONNX export use);
    ``forward(x, all_outputs=True)`` (or ``forward_train``) returns the head's dict (``features``,
    ``neck``, ``embedding``) for losses; going through ``forward`` keeps DistributedDataParallel's
    hooks in the path.

    After :meth:`freeze_batchnorm`, ``train()`` leaves the backbone's BatchNorm layers in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen_bn = False

    @property
    def embedding_dim(self) -> int:
        """The width of what :meth:`forward` gives (``model.retrieval``)."""
        return self.head.retrieval_dim

    @property
    def loss_dim(self) -> int:
        """The width of the embedding the losses take (``model.embedding_dim``, or the pooled map's)."""
        return self.head.dim

    def backbone_batchnorms(self) -> List[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def backbone_parameters(self) -> List[nn.Parameter]:
        return list(self.backbone.parameters())

    def freeze_batchnorm(self, affine: bool = True) -> int:
        """Keep every BatchNorm of the backbone in eval mode from now on: its running mean and
        variance stay as loaded (pretrained statistics), also across ``train()`` calls. With
        ``affine`` its weight and bias stop requiring gradients too (so optimizers built afterwards
        leave them out). The head's BNNeck is not touched. Returns the number of layers frozen."""
        layers = self.backbone_batchnorms()
        self.frozen_bn = True
        for m in layers:
            m.eval()
            if affine:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
        return len(layers)

    def train(self, mode: bool = True) -> "Embedder":
        super().train(mode)
        if mode and self.frozen_bn:
            for m in self.backbone_batchnorms():
                m.eval()
        return self

    def forward_train(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor, all_outputs: bool = False):
        if all_outputs:
            return self.forward_train(x)
        return self.head.retrieve(self.backbone(x))


class Ensemble(nn.Module):
    """``model.members`` embedders side by side: images in, the members' L2-normalised embeddings
    concatenated and divided by ``sqrt(members)`` out (a unit vector whose cosine similarity with
    another is the mean of the members' cosine similarities). Each member is an :class:`Embedder` of
    its own initial weights; ``forward(x, all_outputs=True)`` gives the joined ``embedding`` and each
    member's head dict under ``members``, so that every member's loss is its own
    (:func:`deepmetric.engine.step.batch_loss`): training them together on the same batches is
    training each alone, and the ensemble averages what their seeds make them disagree on."""

    def __init__(self, members: List[Embedder]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an Ensemble needs at least 2 members")
        self.members = nn.ModuleList(members)

    @property
    def embedding_dim(self) -> int:
        return sum(m.embedding_dim for m in self.members)

    def backbone_batchnorms(self) -> List[nn.Module]:
        return [bn for m in self.members for bn in m.backbone_batchnorms()]

    def freeze_batchnorm(self, affine: bool = True) -> int:
        return sum(m.freeze_batchnorm(affine) for m in self.members)

    def backbone_parameters(self) -> List[nn.Parameter]:
        return [p for m in self.members for p in m.backbone_parameters()]

    def forward_train(self, x: torch.Tensor) -> Dict[str, object]:
        outs = [m.forward_train(x) for m in self.members]
        return {"embedding": join_embeddings([o["embedding"] for o in outs]), "members": outs}

    def forward(self, x: torch.Tensor, all_outputs: bool = False):
        if all_outputs:
            return self.forward_train(x)
        return join_embeddings([m(x) for m in self.members])


@contextmanager
def retrieval_as(model: nn.Module, retrieval: str) -> Iterator[nn.Module]:
    """Within the block, every :class:`~deepmetric.models.heads.EmbeddingHead` of ``model`` (an
    ensemble's members', a moving average's copy) retrieves ``retrieval`` (``embedding`` or
    ``pooled``); as before afterwards."""
    heads = [m for m in model.modules() if isinstance(m, EmbeddingHead)]
    saved = [h.retrieval for h in heads]
    try:
        for h in heads:
            h.retrieval = retrieval
        yield model
    finally:
        for h, r in zip(heads, saved):
            h.retrieval = r


def join_embeddings(embeddings: List[torch.Tensor]) -> torch.Tensor:
    """Each ``(B, D_i)`` L2-normalised, side by side, divided by ``sqrt(len(embeddings))``: a unit vector."""
    return torch.cat([F.normalize(e, dim=1) for e in embeddings], dim=1) / len(embeddings) ** 0.5


@dataclass
class LoadReport:
    """What a weights file gave a module: keys loaded, missing (left at init) and unexpected."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)

    def summary(self) -> str:
        def few(keys: List[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")

        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"missing {len(self.missing)} (kept at init: {few(self.missing)})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} (ignored: {few(self.unexpected)})")
        if self.shape_mismatch:
            parts.append(f"shape mismatch {len(self.shape_mismatch)} (kept at init: {few(self.shape_mismatch)})")
        return "; ".join(parts)


class WeightsError(UserError):
    """A weights file that cannot be used; the message names the file."""


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """Read a torchvision/timm ``.pth``/``.pt``/``.bin`` or a ``.safetensors`` file into a flat state dict.

    Accepts checkpoints that wrap the weights under ``state_dict``/``model``/``module.`` prefixes.
    Refuses (:class:`WeightsError`, naming the file and tensor) a file holding NaN or infinite
    values: weights saved after a run diverged would only fail later, far from the cause.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/foreign files raise many different types
        raise WeightsError(f"cannot read weights file {p}: {type(e).__name__}: {e}".splitlines()[0]) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise WeightsError(f"{p} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    bad = first_nonfinite(sd)
    if bad is not None:
        key, count = bad
        raise WeightsError(f"{p}: tensor {key} holds {count} NaN/infinite values (saved after the run diverged?); "
                           "use an earlier checkpoint, or retrain with a lower optimizer.lr or train.grad_clip")
    return sd


def first_nonfinite(state: Dict[str, torch.Tensor]) -> Optional[tuple[str, int]]:
    """``(key, number of NaN/inf entries)`` of the first floating tensor that has any, else ``None``."""
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                return key, count
    return None


def weight_mismatches(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], prefix: str = "",
                      only: tuple[str, ...] = ("",)) -> List[str]:
    """What keeps ``state`` (keys without ``prefix``) from loading into a module whose state dict is
    ``own``, for the module keys starting with one of ``only``: shape differences first (the telling
    ones), then tensors missing from the file, then tensors the module lacks. Empty when it fits."""
    def wanted(k: str) -> bool:
        return k.startswith(only) and not k.endswith("num_batches_tracked")

    shapes, unexpected = [], []
    for key, tensor in state.items():
        k = prefix + key
        if k not in own:
            if wanted(k):
                unexpected.append(f"tensor {key} is in the file but not in the model")
        elif own[k].shape != tensor.shape and wanted(k):
            shapes.append(f"tensor {key} has shape {tuple(tensor.shape)} in the file, "
                          f"{tuple(own[k].shape)} in the model")
    in_file = {prefix + key for key in state}
    missing = [f"tensor {k} of the model is not in the file" for k in own if wanted(k) and k not in in_file]
    return shapes + missing + unexpected


def load_weights(module: nn.Module, state: Dict[str, torch.Tensor], source: str,
                 prefix: str = "", skip: tuple[str, ...] = (), require: tuple[str, ...] = ()) -> LoadReport:
    """Copy every tensor of ``state`` whose (prefixed) key and shape match ``module``'s.

    Keys starting with any of ``skip`` are ignored (e.g. a stage-one run's classifier). Module keys
    starting with any of ``require`` (``("backbone.",)``: the same trunk) must all load: any
    difference there raises :class:`WeightsError` naming the first tensor, before anything is copied.
    Nothing fails silently: the returned report lists loaded, missing, unexpected and mismatched keys.
    """
    own = module.state_dict()
    if require:
        kept = {k: v for k, v in state.items() if not any(k.startswith(s) for s in skip)}
        problems = weight_mismatches(own, kept, prefix, only=require)
        if problems:
            raise WeightsError(f"{source}: another architecture than this model ({problems[0]}; "
                               f"{len(problems)} difference{'s' if len(problems) > 1 else ''} in "
                               f"{', '.join(r + '*' for r in require)})")
    report = LoadReport(source)
    matched = {}
    for key, tensor in state.items():
        if any(key.startswith(s) for s in skip):
            continue
        k = prefix + key
        if k not in own:
            report.unexpected.append(key)
        elif own[k].shape != tensor.shape:
            report.shape_mismatch.append(f"{key} {tuple(tensor.shape)}->{tuple(own[k].shape)}")
        else:
            matched[k] = tensor
            report.loaded.append(key)
    report.missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if not matched:
        raise WeightsError(f"{source}: no tensor matches this model (first keys in file: {', '.join(list(state)[:4])})")
    module.load_state_dict(matched, strict=False)
    return report


def load_pretrained(model: Embedder, pretrained: str, backbone_name: str) -> LoadReport:
    """Initialise the backbone from a local torchvision/timm weights file, or ``imagenet`` (download).

    Offline, ``imagenet`` fails with a message saying to pass a local file.
    """
    if pretrained == "imagenet":
        state = _download_imagenet(backbone_name)
        source = f"imagenet weights for {backbone_name}"
    else:
        state = read_state_dict(pretrained)
        source = str(pretrained)
    stem = getattr(model.backbone, "conv1", None)  # the ResNet trunks' first convolution
    if stem is not None and stem.weight.shape[1] != 3:
        w = state.get("conv1.weight")
        if w is not None and w.shape[1] == 3:  # grayscale input: average the RGB filters
            state = dict(state, **{"conv1.weight": w.mean(dim=1, keepdim=True)})
    report = load_weights(model.backbone, state, source, prefix=backbone_state_prefix(model.backbone))
    log.info(report.summary())
    return report


def _download_imagenet(backbone_name: str) -> Dict[str, torch.Tensor]:
    hint = ("no network to download ImageNet weights; pass a local file instead: "
            "model.pretrained=/path/to/resnet50.pth (torchvision or timm state dict)")
    try:
        if backbone_name.startswith("timm:"):
            import timm

            return timm.create_model(backbone_name[5:], pretrained=True).state_dict()
        import torchvision.models as tvm

        if backbone_name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise WeightsError(f"model.pretrained=imagenet: no ImageNet weights for backbone '{backbone_name}'")
        return tvm.get_model(backbone_name, weights="DEFAULT").state_dict()
    except WeightsError:
        raise
    except Exception as e:  # URLError, ConnectionError, HF hub errors, ...
        raise WeightsError(f"model.pretrained=imagenet: {hint} ({type(e).__name__})") from None
