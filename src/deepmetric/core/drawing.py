"""Where core's objects find their drawing, which lives above core (:mod:`deepmetric.viz`).

Core imports nothing above it, so the package that sits on top (``deepmetric``, when it is imported,
as it is before any of its modules) registers the drawing modules by name here. They are imported on
first use, so ``import deepmetric`` stays free of matplotlib and PyTorch.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

_MODULES: Dict[str, str] = {}


def register(kind: str, module: str) -> None:
    """Draw ``kind`` (e.g. ``"retrieval"``) with ``module`` (a dotted name, imported on first use)."""
    _MODULES[kind] = module


def drawer(kind: str) -> ModuleType:
    """The module registered for ``kind``; a clear error when none is."""
    if kind not in _MODULES:
        raise RuntimeError(f"no drawing registered for {kind!r} (import deepmetric, which registers them)")
    return importlib.import_module(_MODULES[kind])
