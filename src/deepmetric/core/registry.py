"""Name -> constructor catalogues, timm style: each package fills its own when it is imported.

A catalogue entry is a constructor or a ``"module:attr"`` string, imported on first lookup, so a
package can declare its whole catalogue without importing what it lists: ``deepmetric list`` reads
every name without importing PyTorch. A wrong name raises an :class:`UnknownNameError` that lists the
closest registered names, so a typo in a recipe (``loss.name: tripplet``) tells the user what they
meant. Your own constructors join with ``@LOSSES.register("name")``.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, TypeVar, Union

T = TypeVar("T", bound=Callable[..., Any])


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message names the closest valid ones."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a plain sentence
        return str(self.args[0]) if self.args else ""


class Registry:
    """A catalogue of constructors for one kind of thing (``losses``, ``backbones``, ...).

    ``entries`` maps names to constructors or to ``"package.module:attr"`` strings (imported when
    first looked up). Names are case-insensitive.
    """

    def __init__(self, kind: str, entries: Optional[Mapping[str, Union[str, Callable[..., Any]]]] = None) -> None:
        self.kind = kind
        self._table: Dict[str, Union[str, Callable[..., Any]]] = {}
        for name, target in (entries or {}).items():
            self.add(name, target)

    def add(self, name: str, target: Union[str, Callable[..., Any]]) -> None:
        """Register ``target`` (a constructor or a ``"module:attr"`` string) as ``name``."""
        key = name.lower()
        if key in self._table and self._table[key] is not target:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._table[key] = target

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: ``@LOSSES.register("my_loss")``."""

        def deco(fn: T) -> T:
            for name in names:
                self.add(name, fn)
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
        target = self._table[key]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = self._table[key] = getattr(importlib.import_module(module), attr)
        return target

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
