"""Writing files so that a crash never leaves half of one: the one atomic write of the package.

Every file deepmetric writes for later (configs, metrics, reports, plots, embeddings, indexes, exported
models) goes through :func:`atomic_write`; checkpoints, which are folders, compose the same steps
(:func:`write_new_file`, :func:`fsync_dir`) in :mod:`deepmetric.engine.checkpoint`. Files and folders
get the permissions of anything the user creates: ``0o666`` / ``0o777`` less the umask (``mkstemp``
and ``mkdtemp`` would make them private to the user).
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

from .errors import UserError

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


#: the OS errors of a place that cannot be written: a read-only or full disk, a file in the way
WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EISDIR,
                          errno.EEXIST, getattr(errno, "EDQUOT", errno.ENOSPC)})


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> None:
    """Refuse, before any work, a ``path`` that cannot be written (one line naming ``what`` and the
    path): a folder where a file should be (or, with ``folder``, a file where the folder should be),
    a file above it where a folder should be, or a folder this user cannot write in."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: a file, not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{what} {path}: is a folder; name a file to write")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {parent} (permission denied or a read-only disk)")


@contextmanager
def writing(path: str | os.PathLike, what: str, then: str = "") -> Iterator[None]:
    """An OS error writing ``path`` (read-only, disk full, a file in the way) as one line naming it;
    ``then`` says what to do about it."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise UserError(f"{what} {path}: cannot write {e.filename or path}: {e.strerror}{then}") from None
