"""Name -> constructor tables, timm style: things register themselves, builders look them up.

A wrong name raises a ``KeyError`` that lists the closest registered names, so a typo in a
recipe (``loss.name: tripplet``) tells the user what they meant.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterator, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message names the closest valid ones."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a plain sentence
        return str(self.args[0]) if self.args else ""


class Registry:
    """A catalogue of constructors for one kind of thing (``losses``, ``backbones``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: Dict[str, Callable[..., Any]] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: ``@LOSSES.register("arcface", "arcmargin")``."""

        def deco(fn: T) -> T:
            for name in names:
                key = name.lower()
                if key in self._table and self._table[key] is not fn:
                    raise ValueError(f"{self.kind} '{name}' is registered twice")
                self._table[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        key = str(name).lower()
        if key not in self._table:
            close = difflib.get_close_matches(key, list(self._table), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{hint} (known: {', '.join(sorted(self._table))})"
            )
        return self._table[key]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


LOSSES = Registry("loss")
BACKBONES = Registry("backbone")
DATASETS = Registry("dataset")
