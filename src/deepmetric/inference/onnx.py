"""Exported ONNX files, with no PyTorch: onnxruntime sessions and the metadata ``deepmetric export``
writes (see :mod:`deepmetric.inference.export` for its keys). A missing ``onnx`` or ``onnxruntime``
is one line naming the extra that brings it."""
from __future__ import annotations

import importlib
import json
import os
from types import ModuleType
from typing import Any, Dict, Mapping, Optional

from ..core.errors import UserError

#: the ``pip install 'deepmetric[...]'`` extra that brings ``onnx`` and ``onnxruntime`` with PyTorch
ONNX_EXTRA = "serve"
#: the extra that brings ``onnxruntime`` alone (running an exported model)
RUNTIME_EXTRA = "onnx"


class MissingPackageError(UserError):
    """An optional package this needs is not installed; the message names the extra to install."""


def optional_module(name: str, purpose: str, extra: str = ONNX_EXTRA) -> ModuleType:
    """Import ``name`` (``onnx``, ``onnxruntime``) or raise a :class:`MissingPackageError` naming ``extra``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingPackageError(f"{purpose} needs the '{name}' package, which is not installed: "
                                  f"pip install 'deepmetric[{extra}]'") from None


def onnx_session(model: str | os.PathLike | bytes, threads: Optional[int] = None):
    """An onnxruntime CPU ``InferenceSession`` (``threads`` intra-op threads; default: onnxruntime's)."""
    ort = optional_module("onnxruntime", "running an ONNX model", RUNTIME_EXTRA)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    # idle worker threads sleep instead of spinning: a server calls run() from many threads at once
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def decode_metadata(props: Mapping[str, str]) -> Dict[str, Any]:
    """ONNX ``metadata_props`` (all strings) -> values, JSON-decoded where they are JSON."""
    out: Dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def read_onnx_metadata(model: str | os.PathLike | bytes) -> Dict[str, Any]:
    """The ``metadata_props`` of an ONNX file (or bytes) as a dict, JSON values decoded."""
    onnx = optional_module("onnx", "reading ONNX metadata")
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(os.fspath(model), load_external_data=False)
    return decode_metadata({p.key: p.value for p in proto.metadata_props})
