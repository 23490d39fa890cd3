"""Changing the live index over HTTP: ``POST /items`` and ``DELETE /items/{id}``, behind the API key.

| route | in | out |
|---|---|---|
| ``POST /items`` | multipart ``file`` (one or more images), optional ``label`` (one for all, or one per file: class names) | 201 ``{"items": [{"id", "label", "label_name", "name", "image_url"}], "count"}`` |
| ``DELETE /items/{id}`` | an item id | ``{"removed": [id], "count"}`` |

Both need the server's API key from every client, this machine's own included (``X-API-Key`` or
``Authorization: Bearer``, compared with :func:`hmac.compare_digest`): 401 without it or with another,
403 when the server has none (read-only). The key is checked before the body is read
(:class:`~.guards.WriteGuard`). An upload is decoded and embedded exactly as ``/search`` does (the pixel
limit, the worker pool, 503 when busy; all files of one request together at most ``max_upload_bytes``);
:class:`~.gallery.LiveGallery` then makes the change durable before the 2xx, keeps the image under
``items_dir`` (so ``/images/{id}`` serves it) and adds the item to the index. A change the disk refuses
answers 507 (no space) or 500 and changes nothing. Labels are all an item carries besides its image
(the index stores a label and a path per item); an index built from a list file takes numeric labels.
"""
from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from pydantic import BaseModel

from ..core.errors import UserError
from ..inference.index import UnknownItemError
from .gallery import LiveGallery

ITEM_ROUTES = ("/items",)
MAX_FILES = 64  # images per POST /items


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


def add_item_routes(app: FastAPI, predictor: Any, gallery: LiveGallery, run_limited: Callable, pixel_limit: int,
                    upload_limit: int, errors: Dict[Union[int, str], Dict[str, Any]], documented: bool) -> None:
    """``POST /items`` and ``DELETE /items/{item_id}`` (in the OpenAPI schema when ``documented``: a
    read-only server does not list them)."""
    def error(description: str) -> Dict[str, Any]:
        return {**errors[400], "description": description}

    auth = {401: error("API key missing or wrong (every client)"),
            403: error("the server has no API key: it is read-only")}
    storage = {500: error("the change could not be written (a read-only or failing disk); nothing was changed"),
               507: error("no space left for the change; nothing was changed")}
    stopping = {503: error("busy, or the server is stopping; retry later")}

    def embed(uploads: List[tuple]):
        # one image decoded at a time: a request holds one decoded image, as /search does
        return np.concatenate([predictor.embed_images([predictor.decode(data, pixel_limit)]) for _, data in uploads])

    def add(vectors: Any, uploads: List[tuple], labels: List[str]) -> AddedOut:
        added, count = gallery.add(vectors, uploads, labels)
        return AddedOut(items=[ItemOut.of(a.id, a.label, a.label_name, a.path) for a in added], count=count)

    @app.post("/items", status_code=201, response_model=AddedOut, include_in_schema=documented,
              summary="Add images to the live index (needs the API key)",
              responses={**errors, **auth, **storage, **stopping})
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
        return await run_limited(add, vectors, uploads, label)

    @app.delete("/items/{item_id}", response_model=RemovedOut, include_in_schema=documented,
                summary="Remove an item from the live index (needs the API key)",
                responses={404: error("no such item"), 409: error("the last item: an index keeps at least one"),
                           422: errors[422], **auth, **storage, **stopping})
    async def remove_item(item_id: int) -> RemovedOut:
        if not -2 ** 63 <= item_id < 2 ** 63:
            raise HTTPException(404, f"no item with id {item_id} in the index")
        try:
            removed, count = await run_limited(gallery.remove, item_id)
        except UnknownItemError as e:
            raise HTTPException(404, str(e)) from None
        except UserError as e:
            if hasattr(e, "status"):
                raise
            raise HTTPException(409, str(e)) from None
        return RemovedOut(removed=removed, count=count)


def lifespan(gallery: Optional[LiveGallery]) -> Callable:
    """The app's lifespan: when the server stops, the gallery saves the index and lets it go."""
    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        yield
        if gallery is not None:
            gallery.close()

    return run
