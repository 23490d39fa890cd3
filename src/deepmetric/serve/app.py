"""The search service: :func:`create_app` turns a loaded :class:`Predictor` and :class:`SearchIndex` into a
FastAPI app.

| route | in | out |
|---|---|---|
| ``GET /`` | | the search page (static HTML + JS, no external resources) |
| ``GET /health`` | | model, index and limits |
| ``POST /embed`` | multipart ``file`` (an image) | ``{"embedding": [...], "dim", "l2_normalized"}`` |
| ``POST /search?top_k=10`` | multipart ``file`` | ``{"hits": [{"rank", "id", "score", "label", "label_name", "name", "image_url"}], ...}`` |
| ``GET /images/{id}`` | gallery id | the gallery image file stored in the index (404 for any other id) |
| ``GET /docs``, ``/openapi.json`` | | FastAPI's OpenAPI schema and its viewer |

Bad input is a 4xx with a ``detail`` message, never a 500: a body above the upload limit is refused
with 413 before it is read, a file that is not an image gets 415, a corrupt one 400, an image with more
than ``max_pixels`` pixels (a decompression bomb) 413 from its header alone, missing fields 422.

Concurrency: uploads are read on the event loop; decoding, embedding and search run in worker threads,
at most ``workers`` at a time and in arrival order, so the event loop is never starved and latency
grows evenly with load. Within that, the forward pass runs one at a time under the predictor's lock
(its intra-op threads already use the cores); decoding and index searches overlap.
"""
from __future__ import annotations

import io
import logging
import mimetypes
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import anyio
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from ..errors import UserError

log = logging.getLogger("deepmetric.serve")

STATIC = Path(__file__).parent / "static"
UPLOAD_ROUTES = ("/embed", "/search")
MULTIPART_OVERHEAD = 64 * 1024  # boundary lines and part headers around the file
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


class HitOut(BaseModel):
    rank: int
    id: int
    score: float
    label: int
    label_name: Optional[str] = None
    name: Optional[str] = None
    image_url: Optional[str] = None


class SearchOut(BaseModel):
    metric: str
    score_meaning: str
    top_k: int
    hits: List[HitOut]
    took_ms: float


class EmbedOut(BaseModel):
    dim: int
    l2_normalized: bool
    embedding: List[float]


class UploadLimit:
    """ASGI middleware: refuse upload bodies above ``limit`` bytes with 413 without reading them
    (``Content-Length``), or as soon as a chunked body passes the limit."""

    def __init__(self, app: Any, limit: int, routes: tuple = UPLOAD_ROUTES) -> None:
        self.app, self.limit, self.routes = app, limit, routes

    async def _refuse(self, scope: Dict[str, Any], receive: Any, send: Any, size: str) -> None:
        await JSONResponse({"detail": f"upload of {size} bytes is above the limit of {self.limit} bytes"},
                           status_code=413, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send, length.decode())
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(scope, receive, send, f"more than {self.limit}")
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Upload bytes -> RGB ``PIL.Image``, or an :class:`HTTPException` saying what is wrong (4xx)."""
    if not data:
        raise HTTPException(400, "empty upload: send an image file in the 'file' field")
    try:
        # a fixed list of decoders: never hand uploads to plugins that shell out (EPS -> Ghostscript)
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise HTTPException(415, "not an image: send a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - malformed headers raise many types
        raise HTTPException(400, f"cannot read the image header ({type(e).__name__})") from None
    w, h = img.size
    if w * h > max_pixels:  # checked from the header, before any pixel is decoded
        raise HTTPException(413, f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                                 "(decompression-bomb guard); send a smaller image")
    try:
        img.load()
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated data, decoder errors
        raise HTTPException(400, f"corrupt or truncated image ({type(e).__name__}: {e})".splitlines()[0]) from None


def create_app(predictor: Any, index: Any, *, max_upload_mb: float = 10.0, max_pixels: Optional[int] = None,
               max_top_k: int = 100, workers: Optional[int] = None, title: str = "deepmetric search") -> FastAPI:
    """A FastAPI app serving ``index`` with ``predictor``; both are loaded once, by the caller.

    ``workers``: image requests processed at once (default: CPU count, at most 4); the rest queue.
    """
    from .. import __version__

    predictor.check_index(index)
    upload_limit = int(max_upload_mb * 1024 * 1024)
    pixel_limit = int(max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485)
    score_meaning = ("cosine similarity, higher is closer" if index.metric == "cosine"
                     else "squared L2 distance, lower is closer")
    app = FastAPI(title=title, version=__version__,
                  description="Image similarity search: embed an uploaded image and return the nearest gallery images.")
    app.state.predictor, app.state.index = predictor, index
    # Decoding, embedding and search run in worker threads, at most `workers` at once and served in
    # arrival order (anyio's limiter is FIFO): a bounded queue instead of dozens of threads fighting
    # over the GIL, which starves the event loop and gives long latency tails.
    limiter = anyio.CapacityLimiter(workers or min(4, os.cpu_count() or 1))

    async def run_limited(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)
    app.add_middleware(UploadLimit, limit=upload_limit + MULTIPART_OVERHEAD)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        summary = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
        return JSONResponse({"detail": summary or "invalid request", "errors": [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]},
            status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read(upload_limit + 1)
        if len(data) > upload_limit:
            raise HTTPException(413, f"file is larger than the upload limit of {upload_limit} bytes")
        return data

    def embed_bytes(data: bytes):
        return predictor.embed_images([decode_image(data, pixel_limit)])

    @app.get("/health", summary="Service status, model and index")
    def health() -> Dict[str, Any]:
        info = {k: v for k, v in index.info().items() if k != "source"}  # no server paths in responses
        return {"status": "ok", "version": __version__, "runtime": predictor.runtime, "model": predictor.fingerprint,
                "embedding_dim": predictor.embedding_dim, "index": info,
                "max_upload_bytes": upload_limit, "max_pixels": pixel_limit, "max_top_k": max_top_k}

    @app.post("/embed", response_model=EmbedOut, summary="Embed one image")
    async def embed(file: UploadFile = File(..., description="an image file")) -> EmbedOut:
        vec = (await run_limited(embed_bytes, await read_upload(file)))[0]
        return EmbedOut(dim=len(vec), l2_normalized=predictor.normalized, embedding=vec.tolist())

    def search_bytes(data: bytes, top_k: int):
        start = time.perf_counter()
        hits = index.search(embed_bytes(data), k=top_k)[0]
        return hits, (time.perf_counter() - start) * 1000

    @app.post("/search", response_model=SearchOut, summary="Nearest gallery images of an uploaded image")
    async def search(file: UploadFile = File(..., description="the query image"),
                     top_k: int = Query(10, ge=1, le=max_top_k, description="number of hits")) -> SearchOut:
        hits, took = await run_limited(search_bytes, await read_upload(file), top_k)
        out = [HitOut(rank=r, id=h.id, score=h.score, label=h.label, label_name=h.label_name,
                      name=os.path.basename(h.path) if h.path else None,
                      image_url=f"/images/{h.id}" if h.path else None) for r, h in enumerate(hits, start=1)]
        return SearchOut(metric=index.metric, score_meaning=score_meaning, top_k=top_k, hits=out,
                         took_ms=round(took, 3))

    @app.get("/images/{item_id}", summary="A gallery image of the index", response_class=FileResponse,
             responses={404: {"description": "no such gallery item, or its file is gone"}})
    def image(item_id: int) -> FileResponse:
        # Only paths stored in the index are ever served: the id is the sole input.
        if not 0 <= item_id < len(index):
            raise HTTPException(404, f"no gallery item {item_id} (the index holds ids 0..{len(index) - 1})")
        path = index.paths[item_id]
        if not path:
            raise HTTPException(404, f"gallery item {item_id} has no stored image path")
        if not os.path.isfile(path):
            raise HTTPException(404, f"the image file of gallery item {item_id} is no longer on disk")
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
