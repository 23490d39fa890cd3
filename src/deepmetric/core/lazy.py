"""Package attributes imported on first use, so importing a package costs nothing it does not need.

A package whose public names live in modules that import PyTorch (``deepmetric.losses``,
``deepmetric.models``, ``deepmetric.data``) lists them here instead of importing them, and
``import deepmetric.losses`` stays cheap: ``deepmetric --help`` and ``deepmetric list`` never import
PyTorch, and an ONNX model is served without it.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, List, Mapping, Tuple


def lazy_exports(package: str, exports: Mapping[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the module that
    defines it; the first access imports it and keeps it on the package.

    Use in a package's ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__, {...})``.
    """
    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
