"""The image files of items added over HTTP, under ``items_dir``: each belongs to exactly one item.

Every upload gets a new folder, ``items_dir/<16 random hex digits>/<its file name>``, so two items never
share a file, whatever their bytes and names (an upload never skips writing because a file of that name
exists). A file is written and fsynced before its item's change is logged, and unlinked only after the
removal of its item is durable (:mod:`.gallery` calls :meth:`ItemFiles.release` under the index's write
lock, after the log record). References are counted, so a file that older versions shared between two
items (they named folders by content) stays until its last item goes.

On start, :meth:`ItemFiles.clean` removes what a crash left behind: files in that layout that no item
references, and temporary ``.*.tmp`` files. It touches nothing outside the layout, and only in a folder
whose marker (``.deepmetric-items.json``) names this index at this place, so a folder shared with
another index, or moved with stale paths in the index, is never emptied.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from ..core.errors import UserError
from ..core.files import atomic_write, fsync_dir, write_new_file

log = logging.getLogger("deepmetric")

MARKER = ".deepmetric-items.json"
_FOLDER = re.compile(r"^[0-9a-f]{16}$")


def safe_name(name: Optional[str]) -> str:
    """An upload's file name, reduced to a harmless base name (``image`` if nothing is left)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name or "")).lstrip(".")
    return base[-100:] or "image"


class ItemFiles:
    """The files under ``root`` and how many items reference each (``paths``: the index's paths)."""

    def __init__(self, root: Path, index_path: Optional[Path], paths: Iterable[Optional[str]]) -> None:
        self.root = Path(root).resolve()
        self.index_path = None if index_path is None else Path(index_path).resolve()
        prefix = str(self.root) + os.sep
        self.refs: Counter = Counter(p for p in paths if p and p.startswith(prefix))

    @classmethod
    def open(cls, root: Path, index_path: Optional[Path], paths: Iterable[Optional[str]]) -> "ItemFiles":
        """The folder ``root`` (made if missing; refused if it is a file or belongs to another index)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UserError(f"--items-dir {root}: is a file, not a folder; name a folder for the uploaded images")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--items-dir {root}: cannot make the folder ({e.strerror})") from None
        files = cls(root, index_path, paths)
        files._claim()
        return files

    def _claim(self) -> None:
        """Check or write the marker; ``self.cleanable``: whether :meth:`clean` may delete here."""
        marker, mine = self.root / MARKER, {"index": str(self.index_path), "root": str(self.root)}
        try:
            note = json.loads(marker.read_text()) if marker.is_file() else None
        except (OSError, ValueError):
            note = None
        note = note if isinstance(note, dict) else None
        self.cleanable = note is None or note.get("root") == mine["root"]
        if not self.cleanable:  # moved or copied here: the index's paths may name the old place
            return
        if note is not None and note.get("index") != mine["index"] and Path(str(note.get("index"))).exists():
            raise UserError(f"--items-dir {self.root} holds the images of another index ({note['index']}); "
                            "give each served index a folder of its own")
        if note != mine:
            try:
                atomic_write(marker, json.dumps(mine))
            except OSError as e:
                raise UserError(f"--items-dir {self.root}: cannot write there ({e.strerror})") from None

    def write(self, uploads: Sequence[Tuple[Optional[str], bytes]]) -> List[str]:
        """Write each ``(name, bytes)`` into a folder of its own; the paths. Durable when this returns;
        on an error, nothing written stays."""
        paths: List[str] = []
        try:
            for name, data in uploads:
                folder = self.root / secrets.token_hex(8)
                folder.mkdir()
                path = folder / safe_name(name)
                paths.append(str(path))
                write_new_file(path, data)
                fsync_dir(folder)
            fsync_dir(self.root)
        except BaseException:
            self.discard(paths)
            raise
        return paths

    def adopt(self, paths: Sequence[Optional[str]]) -> None:
        """The index now holds items with ``paths`` (call under its write lock)."""
        self.refs.update(p for p in paths if p)

    def discard(self, paths: Sequence[Optional[str]]) -> None:
        """Unlink files :meth:`write` made that no item adopted."""
        for p in paths:
            if p and not self.refs.get(p):
                self._unlink(Path(p))

    def release(self, paths: Sequence[Optional[str]]) -> None:
        """Items with ``paths`` are gone, durably (call under the index's write lock): files of ours
        that no item references any more are unlinked."""
        for p in paths:
            if p and self.refs.get(p):
                self.refs[p] -= 1
                if not self.refs[p]:
                    del self.refs[p]
                    self._unlink(Path(p))

    def _unlink(self, path: Path) -> None:
        if path.parent.parent != self.root or not _FOLDER.match(path.parent.name):
            return  # not an upload of ours
        try:
            path.unlink(missing_ok=True)
            path.parent.rmdir()
        except OSError as e:  # a folder an older version shared between two names; a read-only folder
            if path.exists():
                log.warning("could not remove %s (%s); the next start removes it", path, e.strerror)

    def clean(self) -> int:
        """Remove files in our layout that no item references, and temporary files; returns how many."""
        if not self.cleanable:
            log.warning("%s: not cleaned of orphaned images: its marker names another place (the folder or "
                        "the index moved)", self.root)
            return 0
        removed = 0
        for folder in self.root.iterdir():
            if not (_FOLDER.match(folder.name) and folder.is_dir()):
                continue
            for f in folder.iterdir():
                if f.is_file() and not self.refs.get(str(f)):
                    f.unlink()
                    removed += 1
            try:
                folder.rmdir()
            except OSError:  # still holds a referenced file
                pass
        if removed:
            fsync_dir(self.root)
            log.info("%s: removed %d image files no item references (left by a crash)", self.root, removed)
        return removed
