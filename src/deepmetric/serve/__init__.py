"""Serving: an HTTP search API and web page over a :class:`~deepmetric.inference.index.SearchIndex`.

``create_app(predictor, index)`` (in :mod:`deepmetric.serve.app`) builds the FastAPI app;
``deepmetric serve`` runs it with uvicorn. FastAPI is imported only when an app is built, so the
rest of deepmetric works without the ``serve`` extra.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'deepmetric.serve' has no attribute '{name}'")
