"""Indexes by name: an index file, or a collection of a vector database named by URI
(``milvus://gallery.db``, ``milvus://host:19530/gallery``). :func:`open_index` is what the commands
and the server call with ``--index``; :data:`STORES` lists the databases, by URI scheme."""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from .index import SearchIndex

#: URI scheme -> ``"module:Class"`` of an index kept in a database (its ``open(spec)`` and ``build``)
STORES = {"milvus": "deepmetric.inference.milvus_backend:MilvusIndex"}


def store_of(spec: Any) -> Optional[str]:
    """The :data:`STORES` scheme that ``spec`` names (``milvus://...``, ``milvus+https://...``), else None."""
    text = str(spec)
    scheme = text.partition("://")[0].partition("+")[0] if "://" in text else ""
    return scheme if scheme in STORES else None


def store_class(scheme: str) -> Any:
    """The index class of a :data:`STORES` scheme (imported now: its client is an optional dependency)."""
    module, _, name = STORES[scheme].partition(":")
    return getattr(importlib.import_module(module), name)


def open_index(spec: str | os.PathLike, log: bool = True) -> Any:
    """The index ``spec`` names: a database collection by URI, else an index file
    (:meth:`SearchIndex.load`, its change log replayed with ``log``). ``close()`` it when done."""
    scheme = store_of(spec)
    if scheme is not None:
        return store_class(scheme).open(str(spec))
    return SearchIndex.load(spec, log=log)
