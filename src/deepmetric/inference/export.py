"""Export an :class:`~deepmetric.models.Embedder` to ONNX or TorchScript, with its preprocessing written in.

A deployed model must be fed exactly what it was trained on, so the export carries the conventions
as metadata (ONNX ``metadata_props``; TorchScript extra file ``deepmetric.json``):

| key | example | meaning |
|---|---|---|
| ``input_name`` / ``output_name`` | ``images`` / ``embeddings`` | graph input and output |
| ``input_layout`` | ``NCHW`` | float32, batch axis dynamic |
| ``input_size`` | ``[224, 224]`` | ``H, W`` after the preset's resize/crop (``null``: any size) |
| ``input_shape`` | ``[1, 8, 8]`` | ``C, H, W`` of the training inputs (the checkpoint's ``state.json``), when recorded |
| ``channels``, ``color`` | ``3``, ``RGB`` | ``L`` for one-channel models |
| ``preset`` | ``imagenet`` | the ``deepmetric.data.transforms`` test pipeline (resize, crop) |
| ``mean``, ``std``, ``pixel_range`` | ImageNet, ``0-1`` | input = ``(pixel/255 - mean) / std`` |
| ``normalization_in_graph`` | ``false`` | ``true``: feed 0-255 pixels, the graph normalises (FastReID's convention) |
| ``l2_normalized``, ``embedding_dim`` | ``true``, ``512`` | output rows have unit norm |
| ``deepmetric_version``, ``source_checkpoint``, ``source_fingerprint`` | | provenance |

Values are strings: lists, numbers and booleans JSON-encoded (:func:`read_onnx_metadata` decodes them).
After writing, the export is run on random inputs of two batch sizes and compared with PyTorch (a
model without a fixed ``input_size`` also at several image sizes, odd ones included); a maximum
absolute difference above ``atol`` (1e-4) raises :class:`ExportParityError` and removes the file.

ONNX export needs the optional ``onnx`` and ``onnxruntime`` packages (the :data:`ONNX_EXTRA` extra);
without them a :class:`~deepmetric.inference.onnx.MissingPackageError` says what to install, before
anything is loaded. Files are written whole (a temporary sibling,
fsynced, renamed) with the permissions of any file the user creates (``0o666 & ~umask``).
"""
from __future__ import annotations

import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.errors import UserError
from ..core.files import atomic_write, file_fingerprint
from .onnx import ONNX_EXTRA, RUNTIME_EXTRA, onnx_session, optional_module, read_onnx_metadata

__all__ = ["export_checkpoint", "export_onnx", "export_torchscript", "onnx_bytes", "preprocessing_metadata",
           "read_onnx_metadata", "read_torchscript_metadata", "onnx_session", "ExportError", "ExportParityError",
           "ExportReport", "ONNX_EXTRA", "RUNTIME_EXTRA"]

log = logging.getLogger("deepmetric")

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
DEFAULT_ATOL = 1e-4
FORMATS = ("onnx", "torchscript")
#: image sizes a size-free (``input_size: null``) export is checked at, besides ``fallback_size``
DYNAMIC_CHECK_SIZES = ((8, 8), (32, 32), (29, 37))


class ExportError(UserError):
    """An export that cannot be done (unknown format, parity lost)."""


class ExportParityError(ExportError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


@dataclass
class ExportReport:
    """What an export wrote and how closely it matches PyTorch (max abs difference over test batches)."""

    path: Optional[Path]
    format: str
    max_abs_diff: float
    atol: float
    batch_sizes: Tuple[int, ...]
    metadata: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        where = f"wrote {self.path}" if self.path else "exported in memory"
        return (f"{where} ({self.format}); parity vs PyTorch on batches {list(self.batch_sizes)}: "
                f"max abs diff {self.max_abs_diff:.3e} (limit {self.atol:.0e})")


def preprocessing_metadata(cfg, model: nn.Module, ckpt_dir: Optional[Path] = None) -> Dict[str, Any]:
    """The metadata dict (see module table) for a model trained with ``cfg``."""
    from ..core import __version__
    from ..data.transforms import describe

    desc = describe(cfg.data.transform, tuple(cfg.data.image_size) if cfg.data.image_size else None)
    channels = int(cfg.model.in_chans)
    meta: Dict[str, Any] = {
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "input_layout": "NCHW",
        "input_size": desc["input_size"], "channels": channels, "color": "L" if channels == 1 else "RGB",
        "preset": desc["preset"], "pixel_range": desc["pixel_range"],
        "mean": _per_channel(desc["mean"], channels), "std": _per_channel(desc["std"], channels),
        "normalization_in_graph": False, "l2_normalized": bool(cfg.model.normalize),
        "embedding_dim": int(model.embedding_dim), "deepmetric_version": __version__,
    }
    if ckpt_dir is not None:
        meta["source_checkpoint"] = str(ckpt_dir)
        weights = Path(ckpt_dir) / "model.safetensors"
        if weights.is_file():
            meta["source_fingerprint"] = file_fingerprint(weights)
        shape = _input_shape(Path(ckpt_dir))
        if shape is not None:
            meta["input_shape"] = shape
    return meta


def _input_shape(ckpt_dir: Path) -> Optional[List[int]]:
    """The ``input_shape`` ``[C, H, W]`` the trainer recorded in the checkpoint's ``state.json`` (the size
    its inputs had; None if absent or malformed)."""
    from ..engine.checkpoint import STATE, read_checkpoint

    source = ckpt_dir / STATE
    shape = read_checkpoint(ckpt_dir)[1].get("input_shape")
    if shape is None:
        return None
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        log.warning("%s: state.json input_shape %r is not [C, H, W] of positive ints; ignoring it", source, shape)
        return None
    return [int(v) for v in shape]


def _per_channel(values: Sequence[float], channels: int) -> list:
    from ..data.transforms import channel_stats

    values = [float(v) for v in channel_stats(values, channels)]
    return values * channels if len(values) == 1 else values


class _NormalizeInside(nn.Module):
    """``model((x - 255 mean) / (255 std))``: takes 0-255 pixels (FastReID's export convention)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("scale", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.shift) / self.scale)


def _prepare(model: nn.Module, meta: Dict[str, Any], normalization_in_graph: bool) -> Tuple[nn.Module, Dict[str, Any]]:
    model = model.cpu().eval()
    meta = dict(meta, normalization_in_graph=bool(normalization_in_graph))
    if normalization_in_graph:
        model = _NormalizeInside(model, meta["mean"], meta["std"]).eval()
    return model, meta


def _random_inputs(meta: Dict[str, Any], batch: int, seed: int, fallback_size: Tuple[int, int]) -> torch.Tensor:
    """Random inputs at the model's ``input_size``, or at ``fallback_size`` for a size-free model."""
    h, w = meta["input_size"] or fallback_size
    g = torch.Generator().manual_seed(seed)
    if meta.get("normalization_in_graph"):
        return torch.rand(batch, meta["channels"], h, w, generator=g) * 255.0
    return torch.randn(batch, meta["channels"], h, w, generator=g)


def onnx_bytes(model: nn.Module, meta: Dict[str, Any], *, normalization_in_graph: bool = False, opset: int = 17,
               fallback_size: Tuple[int, int] = (64, 64)) -> Tuple[bytes, Dict[str, Any]]:
    """The serialised ONNX model (dynamic batch axis; dynamic H, W when ``input_size`` is null) and its
    metadata dict. Uses the TorchScript-based exporter (``dynamo=False``), which needs no onnxscript."""
    onnx = optional_module("onnx", "ONNX export")
    model, meta = _prepare(model, meta, normalization_in_graph)
    axes = {0: "batch"} if meta["input_size"] else {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (_random_inputs(meta, 2, 0, fallback_size),), buf, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "deepmetric"
    return proto.SerializeToString(), meta


def _check_sizes(meta: Dict[str, Any], fallback_size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """``[input_size]``, or for a size-free model ``fallback_size`` and :data:`DYNAMIC_CHECK_SIZES`: a
    graph that kept the traced size (or one bin layout of an adaptive pooling) fails at the others."""
    if meta["input_size"]:
        return [tuple(meta["input_size"])]
    return list(dict.fromkeys([tuple(fallback_size), *DYNAMIC_CHECK_SIZES]))


def _parity(run, model: nn.Module, meta: Dict[str, Any], batch_sizes: Sequence[int],
            fallback_size: Tuple[int, int]) -> float:
    worst = 0.0
    with torch.no_grad():
        for j, size in enumerate(_check_sizes(meta, fallback_size)):
            for i, b in enumerate(batch_sizes):
                x = _random_inputs(meta, b, 1000 + 10 * j + i, size)
                ref = model(x).float().numpy()
                got = np.asarray(run(x))
                if got.shape != ref.shape:
                    raise ExportParityError(f"exported model returned shape {got.shape} for input "
                                            f"{tuple(x.shape)}, PyTorch {ref.shape}")
                worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def _check(report: ExportReport, path: Optional[Path]) -> ExportReport:
    if not report.max_abs_diff <= report.atol:  # also catches NaN
        if path is not None:
            path.unlink(missing_ok=True)
        raise ExportParityError(
            f"{report.format} export of {path or 'the model'} differs from PyTorch by {report.max_abs_diff:.3e} "
            f"> {report.atol:.0e} (max abs diff over random inputs); the file was not kept. Try another "
            "--opset, or report the model's layers as a bug")
    return report


def export_onnx(model: nn.Module, output: str | os.PathLike, meta: Dict[str, Any], *,
                normalization_in_graph: bool = False, opset: int = 17, atol: float = DEFAULT_ATOL,
                batch_sizes: Sequence[int] = (1, 3), fallback_size: Tuple[int, int] = (64, 64)) -> ExportReport:
    """Write ``model`` as ONNX to ``output`` and check it against PyTorch with onnxruntime.

    Raises :class:`ExportParityError` (file removed) when the max abs difference exceeds ``atol``.
    """
    data, meta = onnx_bytes(model, meta, normalization_in_graph=normalization_in_graph, opset=opset,
                            fallback_size=fallback_size)
    path = Path(output)
    atomic_write(path, data)
    session = onnx_session(path)
    ref, _ = _prepare(model, meta, normalization_in_graph)
    diff = _parity(lambda x: session.run(None, {INPUT_NAME: x.numpy()})[0], ref, meta, batch_sizes, fallback_size)
    return _check(ExportReport(path, "onnx", diff, atol, tuple(batch_sizes), meta), path)


def export_torchscript(model: nn.Module, output: str | os.PathLike, meta: Dict[str, Any], *,
                       normalization_in_graph: bool = False, atol: float = DEFAULT_ATOL,
                       batch_sizes: Sequence[int] = (1, 3), fallback_size: Tuple[int, int] = (64, 64)) -> ExportReport:
    """Trace ``model`` with TorchScript, save it (metadata in the extra file ``deepmetric.json``), reload
    it and compare with eager PyTorch on other batch sizes than the traced one."""
    ref, meta = _prepare(model, meta, normalization_in_graph)
    path = Path(output)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the portable C++ format
        traced = torch.jit.trace(ref, _random_inputs(meta, 2, 0, fallback_size), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"deepmetric.json": json.dumps(meta)})
        atomic_write(path, buf.getvalue())
        loaded = torch.jit.load(str(path), map_location="cpu")
        diff = _parity(lambda x: loaded(x).numpy(), ref, meta, batch_sizes, fallback_size)
    return _check(ExportReport(path, "torchscript", diff, atol, tuple(batch_sizes), meta), path)


def read_torchscript_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """The ``deepmetric.json`` metadata of a TorchScript file written by :func:`export_torchscript`."""
    extra = {"deepmetric.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["deepmetric.json"] or "{}")


_EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike, *,
                      normalization_in_graph: bool = False, atol: float = DEFAULT_ATOL, **kwargs: Any) -> ExportReport:
    """Load a run or checkpoint directory and export its model (``fmt``: ``onnx`` or ``torchscript``)."""
    from ..engine.build import load_for_inference

    try:
        exporter = _EXPORTERS[fmt]
    except KeyError:
        raise ExportError(f"unknown export format {fmt!r} (valid: {', '.join(FORMATS)})") from None
    if fmt == "onnx":  # before loading anything: a missing package is said in one line
        optional_module("onnx", "ONNX export")
        optional_module("onnxruntime", "the ONNX parity check")
    model, cfg, ckpt = load_for_inference(checkpoint, device="cpu")
    meta = preprocessing_metadata(cfg, model, ckpt)
    return exporter(model, output, meta, normalization_in_graph=normalization_in_graph, atol=atol, **kwargs)
