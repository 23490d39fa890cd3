"""Errors that mean bad input (a file, key or value), as opposed to bugs.

The CLI prints a :class:`UserError` as one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the file, key or value and what was expected."""
