"""Errors that mean bad input (a file, key or value), as opposed to bugs.

The CLI prints a :class:`UserError` as one line and exits with code 2; anything else is a bug and
keeps its traceback.

A component (a sampler, a transform, a backbone, a dataset format) knows its parameters, not the
recipe keys that set them, so its errors are :class:`ParameterError` s that write each parameter as a
``{name}`` field: ``str()`` shows the bare name (``batch_size=8 x 2 process(es) ...``), and the one
place that builds components from a recipe, :mod:`deepmetric.engine.build`, shows the key instead
(``data.batch_size=8 x 2 process(es) ...``) with :meth:`ParameterError.naming`.
"""
from __future__ import annotations

from typing import Mapping


class UserError(ValueError):
    """Bad input from the user: the message names the file, key or value and what was expected."""


class ParameterError(UserError):
    """A bad argument to a component. ``message`` writes each of ``params`` as ``{name}``.

    >>> e = ParameterError("{batch_size}=8 is too large; lower {batch_size}", "batch_size")
    >>> str(e), e.naming({"batch_size": "data.batch_size"})
    ('batch_size=8 is too large; lower batch_size', 'data.batch_size=8 is too large; lower data.batch_size')
    """

    def __init__(self, message: str, *params: str) -> None:
        self.template, self.params = message, params
        super().__init__(self.naming({}))

    def naming(self, keys: Mapping[str, str]) -> str:
        """The message with each parameter written as ``keys[name]`` (its bare name where absent)."""
        text = self.template
        for name in self.params:
            text = text.replace("{" + name + "}", keys.get(name, name))
        return text

    def renamed(self, keys: Mapping[str, str]) -> "ParameterError":
        """The same error (same type), its message naming ``keys``: ``raise e.renamed(keys) from None``."""
        out = type(self).__new__(type(self))
        ParameterError.__init__(out, self.naming(keys))
        return out
