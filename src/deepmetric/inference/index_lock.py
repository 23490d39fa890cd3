"""Who may change an index file: one offline edit at a time, and no offline edit while a server owns it.

Both take an exclusive ``flock`` on the sidecar ``.INDEX.lock`` and write what they are into it (JSON
``{"pid", "role"}``, ``role`` ``"edit"`` or ``"serve"``). An edit (:func:`editing`, used by
``deepmetric index add / remove`` and :func:`~deepmetric.inference.index.edit_index`) waits for another
edit, but refuses at once an index a live server holds: the server would overwrite the edit with its
next save. A server (:func:`serving`) holds the lock from start to stop and refuses to start on an index
another server holds. The kernel drops a ``flock`` when its process dies, so the lock of a killed
server is taken over by the next comer; what it wrote is then only a stale note. Without ``fcntl``
(Windows) the note alone is checked: a server's note with a live PID refuses an edit.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from ..core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

POLL_S = 0.05


class IndexLockedError(UserError):
    """The index file is owned by a running server (or another server, for a server)."""


def lock_path(index_path: Path) -> Path:
    return index_path.with_name(f".{index_path.name}.lock")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _note(f: Any) -> Dict[str, Any]:
    f.seek(0)
    try:
        note = json.loads(f.read() or "{}")
    except ValueError:
        return {}
    return note if isinstance(note, dict) else {}


def _server_of(f: Any) -> Optional[int]:
    """The PID of the live server the lock file's note names, or None."""
    note = _note(f)
    pid = note.get("pid")
    if note.get("role") == "serve" and isinstance(pid, int) and (pid == os.getpid() or pid_alive(pid)):
        return pid
    return None


def _try_lock(f: Any) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_note(f: Any, role: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "role": role}))
    f.flush()


def _served_message(index_path: Path, pid: int) -> str:
    return (f"{index_path} is being served by 'deepmetric serve' (PID {pid}), which owns it until it stops: change "
            "it through the server (POST /items, DELETE /items/{id}), or stop the server first")


def _acquire(index_path: Path, role: str, wait_s: Optional[float]) -> Any:
    """The open lock file, locked and noted for ``role``; waits for an edit (at most ``wait_s``, None: no
    limit), refuses a live server at once."""
    f = open(lock_path(index_path), "a+")
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            locked = _try_lock(f)
            pid = _server_of(f) if (not locked or fcntl is None) else None
            if pid is not None:
                raise IndexLockedError(_served_message(index_path, pid) if role == "edit" else
                                       f"{index_path} is already served by another 'deepmetric serve' (PID {pid}); "
                                       "stop it first, or serve a copy")
            if locked:
                _write_note(f, role)
                return f
            if deadline is not None and time.monotonic() > deadline:
                raise IndexLockedError(f"{index_path} is locked by an edit (PID {_note(f).get('pid', '?')}) that did "
                                       f"not finish in {wait_s:.0f} s")
            time.sleep(POLL_S)
    except BaseException:
        f.close()
        raise


def _release(f: Any) -> None:
    try:
        f.seek(0)
        f.truncate()
        f.flush()
    finally:
        f.close()  # closing drops the flock


@contextmanager
def editing(index_path: Path) -> Iterator[None]:
    """Hold the edit lock of ``index_path`` for the block: waits for other edits, refuses a live server."""
    f = _acquire(Path(index_path), "edit", None)
    try:
        yield
    finally:
        _release(f)


class ServerLock:
    """The lock a server holds on its index file from :func:`serving` until :meth:`release`."""

    def __init__(self, index_path: Path, f: Any) -> None:
        self.index_path, self._file = index_path, f

    def release(self) -> None:
        if self._file is not None:
            _release(self._file)
            self._file = None


def serving(index_path: Path, wait_s: float = 30.0) -> ServerLock:
    """Take the index for a server: waits up to ``wait_s`` for an edit to finish; refuses an index
    another live server holds (:class:`IndexLockedError`)."""
    return ServerLock(Path(index_path), _acquire(Path(index_path), "serve", wait_s))


def check_not_served(index_path: Path) -> None:
    """Refuse (:class:`IndexLockedError`) to write ``index_path`` while a live server holds it (for
    ``index build --output`` onto a served index); takes no lock."""
    path = lock_path(Path(index_path))
    if not path.exists():
        return
    with open(path, "a+") as f:
        locked = _try_lock(f)
        pid = _server_of(f) if (not locked or fcntl is None) else None
    if pid is not None:
        raise IndexLockedError(_served_message(Path(index_path), pid))
