"""Which items a search may return: :class:`ItemFilter`, conditions on an index's scalar fields.

Fields: ``id``, ``label``, ``label_name``, ``path`` and ``camera`` (a Milvus index stores camera ids; an
index file does not, and refuses a filter on them). An item passes when each field named in ``only``
holds one of the values listed there, and no entry of ``exclude`` matches it (an entry matches when all
of its fields equal the item's).

The re-ID protocol's rule (a query's own identity seen by its own camera is not an answer,
:mod:`deepmetric.evaluation.reid`) is one ``exclude`` entry:

>>> f = ItemFilter.reid(label=3, camera=1)
>>> f.expression()
'(label != 3 or camera != 1)'
>>> f.mask({"label": np.array([3, 3, 4]), "camera": np.array([1, 2, 1])}).tolist()
[False, True, True]

A Milvus index runs :meth:`ItemFilter.expression`, a Milvus boolean expression written without ``not``
(Milvus Lite 2.5 cannot run it); an index file masks its rows with :meth:`ItemFilter.mask` and
searches deep enough that the masked rows cannot push an allowed one out (:func:`filtered_search`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from .backends import SearchIndexError

#: filterable fields and the type of their values
FIELDS = {"id": int, "label": int, "camera": int, "label_name": str, "path": str}


def _values(name: str, values: Any) -> Tuple[Any, ...]:
    if name not in FIELDS:
        raise SearchIndexError(f"filter: no field {name!r} (fields: {', '.join(FIELDS)})")
    kind = FIELDS[name]
    out = tuple(values) if isinstance(values, (list, tuple, set, frozenset, np.ndarray)) else (values,)
    for v in out:
        ok = isinstance(v, str) if kind is str else isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if not ok:
            raise SearchIndexError(f"filter: {name} takes {kind.__name__} values, got {v!r}")
    return tuple(kind(v) for v in out)


def _literal(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(int(value))


@dataclass(frozen=True)
class ItemFilter:
    """``only``: field -> the values allowed (one or a list); ``exclude``: entries of field -> value,
    each removing the items that match all of its fields."""

    only: Mapping[str, Any] = field(default_factory=dict)
    exclude: Sequence[Mapping[str, Any]] = ()

    def __post_init__(self) -> None:
        only = {k: _values(k, v) for k, v in dict(self.only).items()}
        for k, v in only.items():
            if not v:
                raise SearchIndexError(f"filter: only {k} of an empty list lets no item through")
        exclude = []
        for entry in self.exclude:
            if not entry:
                raise SearchIndexError("filter: an empty exclude entry would exclude every item")
            checked = {k: _values(k, v) for k, v in dict(entry).items()}
            if any(len(v) != 1 for v in checked.values()):
                raise SearchIndexError(f"filter: an exclude entry gives one value per field, got {dict(entry)!r}")
            exclude.append({k: v[0] for k, v in checked.items()})
        object.__setattr__(self, "only", only)
        object.__setattr__(self, "exclude", tuple(exclude))

    @classmethod
    def reid(cls, label: int, camera: int) -> "ItemFilter":
        """Everything but the items of identity ``label`` seen by ``camera`` (the re-ID protocol's junk)."""
        return cls(exclude=[{"label": int(label), "camera": int(camera)}])

    @property
    def fields(self) -> List[str]:
        """The fields the filter reads."""
        names = list(self.only) + [k for entry in self.exclude for k in entry]
        return list(dict.fromkeys(names))

    def expression(self) -> str:
        """The filter as a Milvus boolean expression (``""``: every item)."""
        terms = []
        for k, values in self.only.items():
            terms.append(f"{k} == {_literal(values[0])}" if len(values) == 1
                         else f"{k} in [{', '.join(_literal(v) for v in values)}]")
        for entry in self.exclude:  # not (a and b) == (a' or b'): no `not`, which Milvus Lite 2.5 cannot parse
            inner = " or ".join(f"{k} != {_literal(v)}" for k, v in entry.items())
            terms.append(f"({inner})" if len(entry) > 1 else inner)
        return " and ".join(terms)

    def mask(self, columns: Mapping[str, Any]) -> np.ndarray:
        """``(N,)`` bool: which rows pass, from ``columns`` (field -> ``(N,)`` values, per :attr:`fields`)."""
        n = len(next(iter(columns.values()))) if columns else 0
        keep = np.ones(n, bool)
        for k, values in self.only.items():
            keep &= _isin(columns[k], values)
        for entry in self.exclude:
            hit = np.ones(n, bool)
            for k, v in entry.items():
                hit &= _isin(columns[k], (v,))
            keep &= ~hit
        return keep


def _isin(column: Any, values: Tuple[Any, ...]) -> np.ndarray:
    if isinstance(values[0], str):
        wanted = set(values)
        return np.fromiter((v in wanted for v in column), bool, count=len(column))
    return np.isin(np.asarray(column), np.asarray(values, np.int64))


Filter = Union[None, ItemFilter, str]


def per_query(filter: Any, n: int) -> List[Filter]:
    """``filter`` for each of ``n`` queries: one filter (or None) for all, or a sequence of one per query."""
    if filter is None or isinstance(filter, (ItemFilter, str)):
        return [filter] * n
    filters = list(filter)
    if len(filters) != n:
        raise SearchIndexError(f"search: {len(filters)} filters for {n} queries; give one for all, or one per query")
    for f in filters:
        if f is not None and not isinstance(f, (ItemFilter, str)):
            raise SearchIndexError(f"search: a filter is an ItemFilter (or None), got {type(f).__name__}")
    return filters


def groups(filters: Sequence[Filter]) -> List[Tuple[Filter, np.ndarray]]:
    """The queries that share a filter: ``[(filter, query rows (m,) int64)]``, in first-seen order."""
    rows: Dict[Any, List[int]] = {}
    first: Dict[Any, Filter] = {}
    for i, f in enumerate(filters):
        key = f if f is None or isinstance(f, str) else ("filter", f.expression())
        rows.setdefault(key, []).append(i)
        first.setdefault(key, f)
    return [(first[key], np.asarray(r, np.int64)) for key, r in rows.items()]


def filtered_search(search: Callable[[np.ndarray, int], Tuple[np.ndarray, np.ndarray]], q: np.ndarray, k: int,
                    filter: Any, columns: Callable[[List[str]], Dict[str, Any]], n: int
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """``search(q, k)`` over ``n`` rows, keeping the rows each query's filter passes: ``(scores, rows)``
    ``(Q, min(k, n))``, rows -1 (scores NaN) where fewer pass. Each group of queries sharing a filter
    searches ``k`` plus the number of rows the filter removes, so on exact backends no removed row can
    push an allowed one out: the result is exact search over the allowed rows. On approximate backends
    it is the allowed part of a deeper candidate list."""
    width = min(k, n)
    scores, rows = np.full((len(q), width), np.nan, np.float32), np.full((len(q), width), -1, np.int64)
    for f, members in groups(per_query(filter, len(q))):
        if isinstance(f, str):
            raise SearchIndexError("search: a filter expression (a string) is for a Milvus index; an index file "
                                   "takes an ItemFilter")
        mask = None if f is None else f.mask(columns(f.fields))
        deep = width if mask is None else min(n, width + int(n - mask.sum()))
        s, r = search(q[members], deep)
        keep = r >= 0 if mask is None else (r >= 0) & mask[np.maximum(r, 0)]
        order = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # passing rows first, rank order kept
        s, r, keep = (np.take_along_axis(a, order, 1) for a in (s, r, keep))
        scores[members, :s.shape[1]] = np.where(keep, s, np.nan)
        rows[members, :r.shape[1]] = np.where(keep, r, -1)
    return scores, rows

