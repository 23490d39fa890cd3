"""Writing files so that a crash never leaves half of one: the one atomic write of the package.

Every file deepmetric writes for later (configs, metrics, reports, plots, embeddings, indexes, exported
models) goes through :func:`atomic_write`; checkpoints, which are folders, compose the same steps
(:func:`write_new_file`, :func:`fsync_dir`) in :mod:`deepmetric.engine.checkpoint`. Files and folders
get the permissions of anything the user creates: ``0o666`` / ``0o777`` less the umask (``mkstemp``
and ``mkdtemp`` would make them private to the user).
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

Content = Union[bytes, str, Callable[[BinaryIO], None]]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (new files, renames) durable; POSIX only (Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(f: BinaryIO, content: Content) -> None:
    if callable(content):
        content(f)
    else:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    f.flush()
    os.fsync(f.fileno())


def write_new_file(path: str | os.PathLike, content: Content) -> None:
    """Create ``path`` (it must not exist), write ``content`` (bytes, text as UTF-8, or a function
    that writes to the binary file) and fsync it."""
    with open(path, "xb") as f:  # 0o666 less the umask
        _write(f, content)


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Replace ``path`` whole or not at all; returns it.

    ``content`` (as :func:`write_new_file`) goes to a new sibling ``.NAME.XXXXXXXX.tmp``, which is
    fsynced and renamed over ``path``; then the folder is fsynced, so the rename survives a power cut.
    A crash leaves the old file or the new one, never a mix; an error removes the sibling. Missing
    parent folders are made.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        write_new_file(tmp, content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-256 (identifies the weights an index was built with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
