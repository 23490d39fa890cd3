"""Changing the live index over HTTP: ``POST /items`` and ``DELETE /items/{id}``, behind the API key.

| route | in | out |
|---|---|---|
| ``POST /items`` | multipart ``file`` (one or more images), optional ``label`` (one for all, or one per file: class names) | 201 ``{"items": [{"id", "label", "label_name", "name", "image_url"}], "count"}`` |
| ``DELETE /items/{id}`` | an item id | ``{"removed": [id], "count"}`` |

Both need the server's API key from every client, this machine's own included (``X-API-Key`` or
``Authorization: Bearer``, compared with :func:`hmac.compare_digest`): 401 without it or with another,
403 when the server has none (read-only). The key is checked before the body is read. An upload is
decoded and embedded exactly as ``/search`` does (the pixel limit, the worker pool, 503 when busy; all
files of one request together at most ``max_upload_bytes``), its image kept under ``items_dir`` (so
``/images/{id}`` serves it) and added to the index. With ``index_path`` the index is saved there
atomically every ``save_every`` changes (0: only when the server stops) and when the server stops.
The server owns that file while it runs: a ``deepmetric index add`` / ``remove`` on it meanwhile is
overwritten by the server's next save (stop the server, or change the index through these routes).
Labels are all an item carries besides its image (the index stores a label and a path per item).

Searches and changes share the index under :class:`IndexLock`: any number of searches at once, a
change alone (:class:`~deepmetric.inference.index.SearchIndex` is not safe to change during a search).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..core.errors import UserError
from ..core.files import atomic_write
from ..inference.index import UnknownItemError

log = logging.getLogger("deepmetric")

ITEM_ROUTES = ("/items",)
MAX_FILES = 64  # images per POST /items


class IndexLock:
    """Many readers or one writer (writers first once waiting, so a change is never starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def sent_key(headers: Dict[bytes, bytes]) -> bytes:
    """The key a request carries: ``X-API-Key``, else ``Authorization: Bearer``."""
    auth = headers.get(b"authorization", b"")
    return headers.get(b"x-api-key") or (auth[7:].strip() if auth[:7].lower() == b"bearer " else b"")


def is_write(scope: Dict[str, Any]) -> bool:
    path = scope["path"]
    return (scope["method"] == "POST" and path in ITEM_ROUTES) or (
        scope["method"] == "DELETE" and path.startswith("/items/"))


class WriteGuard:
    """ASGI middleware: ``POST /items`` and ``DELETE /items/...`` need ``key`` from every client (401),
    and a server without one refuses them (403). Checked before the upload gate reads the body."""

    def __init__(self, app: Any, key: Optional[str]) -> None:
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and is_write(scope):
            if self.key is None:
                return await JSONResponse({"detail": "this server is read-only: start it with an API key "
                                                     "(deepmetric serve --api-key-env NAME) to add or remove items"},
                                          status_code=403)(scope, receive, send)
            if not hmac.compare_digest(sent_key(dict(scope["headers"])), self.key):
                return await JSONResponse({"detail": "adding or removing items needs the server's API key: send "
                                                     "it in the X-API-Key header"}, status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


class ItemOut(BaseModel):
    id: int
    label: int
    label_name: Optional[str] = None
    name: Optional[str] = None
    image_url: Optional[str] = None

    @classmethod
    def of(cls, item_id: int, label: int, label_name: Optional[str], path: Optional[str], **extra: Any):
        """An item from its id, label and stored path: ``name`` and ``image_url`` only with a path."""
        return cls(id=int(item_id), label=int(label), label_name=label_name,
                   name=os.path.basename(path) if path else None,
                   image_url=f"/images/{item_id}" if path else None, **extra)


class AddedOut(BaseModel):
    items: List[ItemOut]
    count: int


class RemovedOut(BaseModel):
    removed: List[int]
    count: int


def _safe_name(name: Optional[str]) -> str:
    """An upload's file name, reduced to a harmless base name (``image`` if nothing is left)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name or "")).lstrip(".")
    return base[-100:] or "image"


class ItemStore:
    """What the write routes change: the index (under ``lock``), the uploaded files under ``items_dir``
    (None: items are added without a stored image) and the index file (``index_path``, saved every
    ``save_every`` changes, 0: at shutdown only)."""

    def __init__(self, index: Any, lock: IndexLock, items_dir: Optional[Path] = None,
                 index_path: Optional[Path] = None, save_every: int = 1) -> None:
        self.index, self.lock = index, lock
        self.items_dir = None if items_dir is None else Path(items_dir).resolve()
        self.index_path, self.save_every = (None if index_path is None else Path(index_path)), max(0, int(save_every))
        self.unsaved = 0

    def keep_files(self, uploads: Sequence[tuple]) -> List[Optional[str]]:
        """Write each ``(name, bytes)`` to ``items_dir/<sha256 prefix>/<name>`` (atomically); their paths."""
        if self.items_dir is None:
            return [None] * len(uploads)
        paths = []
        for name, data in uploads:
            path = self.items_dir / hashlib.sha256(data).hexdigest()[:16] / _safe_name(name)
            if not path.is_file():
                atomic_write(path, data)
            paths.append(str(path))
        return paths

    def _labels(self, labels: Sequence[str], n: int) -> tuple:
        """Form labels -> ``(labels (n,), class names or None)``: one for all, one per file, or none."""
        labels = [s.strip() for s in labels]
        if not labels or labels == [""]:
            return [-1] * n, None
        if len(labels) == 1:
            labels = labels * n
        if len(labels) != n:
            raise HTTPException(422, f"{len(labels)} labels for {n} files: send one label for all, or one per file")
        index = self.index
        if index.class_names is None and (index.labels >= 0).any():  # a list-file index: numeric labels
            if not all(s.isdigit() for s in labels):
                raise HTTPException(422, "this index has numeric labels and no class names: send labels as numbers")
            return [int(s) for s in labels], None
        names = sorted(set(labels))
        position = {c: i for i, c in enumerate(names)}
        return [position[s] for s in labels], names

    def add(self, vectors: Any, uploads: Sequence[tuple], labels: Sequence[str]) -> AddedOut:
        paths = self.keep_files(uploads)
        with self.lock.writing():
            try:
                lab, names = self._labels(labels, len(uploads))
                ids = self.index.add(vectors, lab, paths, class_names=names)
            except BaseException:
                self._forget([p for p in paths if p is not None])
                raise
            self._changed()
            rows = {int(i): r for r, i in enumerate(self.index.ids.tolist())}
            out = []
            for item_id in ids.tolist():
                r = rows[int(item_id)]
                label = int(self.index.labels[r])
                out.append(ItemOut.of(item_id, label, self.index.label_name(label), self.index.paths[r]))
            return AddedOut(items=out, count=len(self.index))

    def remove(self, item_id: int) -> RemovedOut:
        with self.lock.writing():
            path = self.index.path_of(item_id) if self.index.mode == "items" else None
            removed = self.index.remove(ids=[item_id])
            self._changed()
            if path:
                self._forget([path])
            return RemovedOut(removed=[int(i) for i in removed.tolist()], count=len(self.index))

    def _forget(self, paths: Sequence[str]) -> None:
        """Delete the files of ``paths`` that are uploads of ours (under ``items_dir``) and in no item."""
        kept = set(self.index.paths)
        for p in map(Path, paths):
            if self.items_dir is not None and p.parent.parent == self.items_dir and str(p) not in kept:
                p.unlink(missing_ok=True)
                try:
                    p.parent.rmdir()
                except OSError:  # another upload of the same bytes under another name
                    pass

    def _changed(self) -> None:
        self.unsaved += 1
        if self.save_every and self.unsaved >= self.save_every:
            self._save()

    def _save(self) -> None:
        if self.index_path is not None and self.unsaved:
            self.index.save(self.index_path)
            self.unsaved = 0

    def save(self) -> None:
        """Save unsaved changes now (the server stops)."""
        with self.lock.reading():
            self._save()


def add_item_routes(app: FastAPI, predictor: Any, store: ItemStore, run_limited: Callable, pixel_limit: int,
                    upload_limit: int, errors: Dict[Union[int, str], Dict[str, Any]], documented: bool) -> None:
    """``POST /items`` and ``DELETE /items/{item_id}`` (in the OpenAPI schema when ``documented``: a
    read-only server does not list them)."""
    def error(description: str) -> Dict[str, Any]:
        return {**errors[400], "description": description}

    auth = {401: error("API key missing or wrong (every client)"),
            403: error("the server has no API key: it is read-only")}

    def embed(uploads: List[tuple]):
        # one image decoded at a time: a request holds one decoded image, as /search does
        return np.concatenate([predictor.embed_images([predictor.decode(data, pixel_limit)]) for _, data in uploads])

    @app.post("/items", status_code=201, response_model=AddedOut, include_in_schema=documented,
              summary="Add images to the live index (needs the API key)", responses={**errors, **auth})
    async def add_items(request: Request, file: List[UploadFile] = File(..., description="one or more images"),
                        label: List[str] = Form([], description="class name: one for all files, or one per file")
                        ) -> AddedOut:
        if len(file) > MAX_FILES:
            raise HTTPException(400, f"{len(file)} files in one request; send at most {MAX_FILES}")
        uploads = []
        for f in file:
            data = await f.read(upload_limit + 1)
            if not data:
                raise HTTPException(400, f"empty upload {f.filename!r}: send image files in the 'file' field")
            uploads.append((f.filename, data))
        vectors = await run_limited(embed, uploads)
        return await run_limited(store.add, vectors, uploads, label)

    @app.delete("/items/{item_id}", response_model=RemovedOut, include_in_schema=documented,
                summary="Remove an item from the live index (needs the API key)",
                responses={404: error("no such item"), 409: error("the last item: an index keeps at least one"),
                           422: errors[422], **auth})
    async def remove_item(item_id: int) -> RemovedOut:
        if not -2 ** 63 <= item_id < 2 ** 63:
            raise HTTPException(404, f"no item with id {item_id} in the index")
        try:
            return await run_limited(store.remove, item_id)
        except UnknownItemError as e:
            raise HTTPException(404, str(e)) from None
        except UserError as e:
            raise HTTPException(409, str(e)) from None


def lifespan(store: Optional[ItemStore]) -> Callable:
    """The app's lifespan: unsaved changes are saved when the server stops."""
    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        yield
        if store is not None:
            store.save()

    return run
