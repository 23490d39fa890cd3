"""FAISS as other libraries leave it.

``faiss.contrib.torch_utils`` (which pytorch-metric-learning imports) replaces ``search`` on every FAISS
index class with a torch-aware one that has no ``params`` argument. Code that searches with
``SearchParameters`` (an HNSW index's ``efSearch``; Milvus Lite 3, which runs FAISS in this process)
then fails with a ``TypeError``. :func:`search_with_params` gives those replacements back a ``params``
path for NumPy input, through the NumPy search FAISS keeps aside as ``search_numpy``; the HNSW backend
and the Milvus index call it before they search.
"""
from __future__ import annotations

import sys

import numpy as np

_MARK = "_deepmetric_takes_params"
_done = False  # torch_utils patches once, at its import: one mend after it is enough


def search_with_params() -> None:
    """If ``faiss.contrib.torch_utils`` is loaded, let every index class's ``search`` take ``params``
    again for NumPy queries (torch tensors go to torch_utils' search, as before). Idempotent, and a
    dictionary lookup once done, so a search path may call it every time."""
    global _done
    if _done or "faiss.contrib.torch_utils" not in sys.modules:
        return
    import faiss

    for name in dir(faiss):
        cls = getattr(faiss, name, None)
        if not isinstance(cls, type):
            continue
        current = cls.__dict__.get("search")
        if current is None or getattr(current, _MARK, False) or not hasattr(cls, "search_numpy"):
            continue
        if getattr(current, "__name__", "") != "torch_replacement_search":
            continue
        cls.search = _with_params(current)
    _done = True


def _with_params(torch_search):
    def search(self, x, k, *, D=None, I=None, params=None):  # noqa: E741 (FAISS's names)
        if params is not None and isinstance(x, np.ndarray):
            return self.search_numpy(x, k, D=D, I=I, params=params)
        return torch_search(self, x, k, D=D, I=I)

    setattr(search, _MARK, True)
    search.__doc__ = torch_search.__doc__
    return search
