"""The search service: :func:`create_app` turns a loaded :class:`Predictor` and :class:`SearchIndex` into a
FastAPI app.

| route | in | out |
|---|---|---|
| ``GET /`` | | the search page (static HTML + JS, no external resources) |
| ``GET /health`` | | model, index and limits |
| ``POST /embed`` | multipart ``file`` (one image) | ``{"embedding": [...], "dim", "l2_normalized"}`` |
| ``POST /search?top_k=10`` | multipart ``file`` | ``{"hits": [{"rank", "id", "score", "label", "label_name", "name", "image_url"}], ...}`` |
| ``GET /images/{id}`` | gallery id | the gallery image file stored in the index (404 for any other id) |
| ``POST /items``, ``DELETE /items/{id}`` | images (+ labels), an id | add to / remove from the live index, with the API key (:mod:`.items`) |
| ``GET /docs``, ``/openapi.json`` | | the OpenAPI schema (every status below is in it) and its viewer |

Every error is JSON ``{"detail": "<message>"}`` (422 adds ``errors``), never a 500:

| status | when |
|---|---|
| 400 | empty, corrupt or truncated image; more than one file; a ``Host`` not in ``allowed_hosts`` |
| 401 | ``api_key`` is set and a client beyond loopback did not send it (``X-API-Key`` or ``Authorization: Bearer``); ``/items`` from any client |
| 403 | ``/items`` on a server without ``api_key`` (read-only) |
| 413 | body above ``max_upload_bytes`` (refused before it is read), image above ``max_pixels`` (from its header) |
| 415 | not an image |
| 422 | missing ``file`` field, bad ``top_k`` or id |
| 503 | ``workers + queue`` image requests already in the server: retry after ``Retry-After`` seconds |

Bounded work per request: an upload is at most ``max_upload_bytes``; its pixels are checked against
``max_pixels`` (default sized to the model's input, :func:`~deepmetric.inference.preprocess.default_max_pixels`)
before decoding; JPEGs decode at reduced scale; every image is brought to the model's input size.
So a request holds at most ``max_upload_bytes + 4 * max_pixels`` bytes (``max_request_bytes`` in
``/health``), and at most ``workers + queue`` requests are in the server at once: the rest get 503
before their body is read.

Concurrency: decoding, embedding and search run in worker threads, at most ``workers`` at a time and
in arrival order, so the event loop is never starved and latency grows evenly with load. The forward
pass runs one at a time under the predictor's lock (its intra-op threads already use the cores).
"""
from __future__ import annotations

import hmac
import ipaddress
import mimetypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import anyio
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ..core.errors import UserError
from . import items
from .items import IndexLock, ItemStore, WriteGuard

STATIC = Path(__file__).parent / "static"
UPLOAD_ROUTES = ("/embed", "/search")
PUBLIC_PATHS = ("/", "/static/")  # the page shell (no data): served without the API key
MULTIPART_OVERHEAD = 64 * 1024  # boundary lines and part headers around the file
RETRY_AFTER_S = 1
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class HitOut(items.ItemOut):
    rank: int
    score: float


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


class IndexOut(BaseModel):
    backend: str
    metric: str
    dim: int
    count: int
    mode: str
    params: Dict[str, Any]


class HealthOut(BaseModel):
    status: str
    version: str
    runtime: str
    model: Optional[str] = None
    embedding_dim: int
    input_shape: Optional[List[int]] = None  # [C, H, W] every upload is brought to; null: unknown
    index: IndexOut
    max_upload_bytes: int
    max_pixels: int
    max_request_bytes: int
    max_top_k: int
    workers: int
    queue: int


class ErrorOut(BaseModel):
    detail: str


class ValidationErrorItem(BaseModel):
    loc: List[Union[str, int]]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: str
    errors: List[ValidationErrorItem]


def _error(description: str, **extra: Any) -> Dict[str, Any]:
    return {"model": ErrorOut, "description": description, **extra}


UPLOAD_ERRORS: Dict[Union[int, str], Dict[str, Any]] = {
    400: _error("empty, corrupt or truncated image, more than one file, or a malformed multipart body"),
    413: _error("upload above max_upload_bytes, or image above max_pixels (refused from its header)"),
    415: _error("not an image: JPEG, PNG, WebP, BMP, GIF, TIFF or PPM"),
    422: {"model": ValidationErrorOut, "description": "missing 'file' field or invalid query parameter"},
    503: _error("the server holds workers + queue image requests already; retry later",
                headers={"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}),
}


def _json(status: int, detail: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _host_name(host: str) -> str:
    """``Host`` header -> name without port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: Optional[str]) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostGuard:
    """ASGI middleware: answer 400 to a ``Host`` header outside ``allowed`` (``*.example.com`` matches
    subdomains), so a DNS-rebinding page cannot read the service through the user's browser."""

    def __init__(self, app: Any, allowed: Sequence[str]) -> None:
        self.app, self.allowed = app, [h.lower() for h in allowed]

    def _allowed(self, name: str) -> bool:
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.allowed)

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self._allowed(_host_name(host)):
                return await _json(400, f"Host {host!r} is not served here (allowed: {', '.join(self.allowed)}); "
                                        "add it with --allowed-hosts")(scope, receive, send)
        return await self.app(scope, receive, send)


class ApiKeyGuard:
    """ASGI middleware: a client beyond loopback must send ``key`` (``X-API-Key: KEY`` or
    ``Authorization: Bearer KEY``) for anything but the page shell; loopback clients need not."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not is_loopback((scope.get("client") or (None,))[0]):
            path = scope["path"]
            public = scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith(PUBLIC_PATHS[1]))
            if not public and not hmac.compare_digest(items.sent_key(dict(scope["headers"])), self.key):
                return await _json(401, "this server needs an API key from clients beyond its own machine: send "
                                        "it in the X-API-Key header", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


class UploadGate:
    """ASGI middleware for the upload routes: 413 for a body above ``limit`` bytes (from
    ``Content-Length`` before reading, or as soon as a chunked body passes it), 503 with
    ``Retry-After`` when ``capacity`` uploads are already in the server, before their body is read.

    The 413 message quotes ``file_limit`` (``max_upload_bytes`` of ``/health``); the body may exceed it
    by the multipart framing allowance.
    """

    def __init__(self, app: Any, file_limit: int, capacity: int, routes: tuple = UPLOAD_ROUTES) -> None:
        self.app, self.file_limit, self.capacity, self.routes = app, file_limit, capacity, routes
        self.limit = file_limit + MULTIPART_OVERHEAD
        self.active = 0  # touched on the event loop only

    async def _too_large(self, scope: Dict[str, Any], receive: Any, send: Any, size: str) -> None:
        await _json(413, f"upload of {size} bytes is above the limit of {self.file_limit} bytes (max_upload_bytes)",
                    {"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send, length.decode())
        if self.active >= self.capacity:
            return await _json(503, f"busy: {self.capacity} image requests are in progress; retry in {RETRY_AFTER_S} s",
                               {"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
        self.active += 1
        try:
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    return await self._too_large(scope, receive, send, f"more than {self.limit}")
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
        finally:
            self.active -= 1


def create_app(predictor: Any, index: Any, *, max_upload_mb: float = 10.0, max_pixels: Optional[int] = None,
               max_top_k: int = 100, workers: Optional[int] = None, queue: int = 16,
               allowed_hosts: Optional[Sequence[str]] = None, api_key: Optional[str] = None,
               items_dir: Optional[Union[str, Path]] = None, index_path: Optional[Union[str, Path]] = None,
               save_every: int = 1, title: str = "deepmetric search") -> FastAPI:
    """A FastAPI app serving ``index`` with ``predictor``; both are loaded once, by the caller.

    ``workers``: image requests processed at once (default: CPU count, at most 4); ``queue``: more
    that may wait, beyond which uploads get 503. ``max_pixels``: largest accepted image (default sized
    to the model's input). ``allowed_hosts``: ``Host`` names served (``None``: any; ``deepmetric serve``
    passes the loopback names when bound to loopback). ``api_key``: required from clients beyond loopback,
    and from every client to change the index (``POST /items``, ``DELETE /items/{id}``; without a key
    the server is read-only). Uploaded items keep their image in ``items_dir`` (None: no image) and
    the index is saved to ``index_path`` every ``save_every`` changes (0: when the server stops) and
    when it stops; see :mod:`.items`.
    """
    from ..core import __version__

    predictor.check_index(index)
    limits = _Limits(upload=int(max_upload_mb * 1024 * 1024), pixels=predictor.pixel_limit(max_pixels),
                     top_k=max_top_k, workers=int(workers or min(4, os.cpu_count() or 1)), queue=max(0, int(queue)))
    guarded: Dict[Union[int, str], Dict[str, Any]] = {}
    if allowed_hosts is not None:
        guarded[400] = _error("Host header not in the allowed hosts")
    if api_key:
        guarded[401] = _error("API key missing or wrong (clients beyond loopback)")
    lock = IndexLock()
    store = ItemStore(index, lock, None if items_dir is None else Path(items_dir),
                      None if index_path is None else Path(index_path), save_every)
    app = FastAPI(title=title, version=__version__, lifespan=items.lifespan(store),
                  description="Image similarity search: embed an uploaded image and return the nearest gallery images.")
    app.state.predictor, app.state.index, app.state.items = predictor, index, store
    # added last = outermost: Host first, then the key, then the write key, then the upload gate
    app.add_middleware(UploadGate, file_limit=limits.upload, capacity=limits.workers + limits.queue,
                       routes=UPLOAD_ROUTES + items.ITEM_ROUTES)
    app.add_middleware(WriteGuard, key=api_key)
    if api_key:
        app.add_middleware(ApiKeyGuard, key=api_key)
    if allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed=list(allowed_hosts))
    _add_error_handlers(app)
    run_limited = _add_search_routes(app, predictor, index, lock, limits, guarded, __version__)
    items.add_item_routes(app, predictor, store, run_limited, limits.pixels, limits.upload, UPLOAD_ERRORS,
                          documented=bool(api_key))
    _add_gallery_routes(app, index, lock, guarded)
    return app


@dataclass(frozen=True)
class _Limits:
    """What one server takes on: bytes per upload, pixels per image, hits per search, requests at once."""

    upload: int
    pixels: int
    top_k: int
    workers: int
    queue: int


def _add_error_handlers(app: FastAPI) -> None:
    """Validation errors as one ``detail`` line (plus ``errors``), :class:`UserError` s with their status."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        summary = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
        return JSONResponse({"detail": summary or "invalid request", "errors": [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]},
            status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return _json(getattr(exc, "status", 400), str(exc))


def _add_search_routes(app: FastAPI, predictor: Any, index: Any, lock: IndexLock, limits: _Limits,
                       guarded: Dict[Union[int, str], Dict[str, Any]], version: str):
    """``/health``, ``/embed`` and ``/search``; returns the worker-pool runner the item routes share."""
    upload_limit, pixel_limit = limits.upload, limits.pixels
    score_meaning = ("cosine similarity, higher is closer" if index.metric == "cosine"
                     else "squared L2 distance, lower is closer")
    # Decoding, embedding and search run in worker threads, at most `workers` at once and served in
    # arrival order (anyio's limiter is FIFO): a bounded queue instead of dozens of threads fighting
    # over the GIL, which starves the event loop and gives long latency tails.
    limiter = anyio.CapacityLimiter(limits.workers)

    async def run_limited(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    async def read_upload(request: Request, file: UploadFile) -> bytes:
        if len((await request.form()).getlist("file")) > 1:  # the form FastAPI parsed, cached
            raise HTTPException(400, "send one image per request: the 'file' field holds several files")
        data = await file.read(upload_limit + 1)
        if len(data) > upload_limit:
            raise HTTPException(413, f"upload of more than {upload_limit} bytes is above the limit of "
                                     f"{upload_limit} bytes (max_upload_bytes)")
        if not data:
            raise HTTPException(400, "empty upload: send an image file in the 'file' field")
        return data

    def embed_bytes(data: bytes):
        return predictor.embed_images([predictor.decode(data, pixel_limit)])

    @app.get("/health", summary="Service status, model, index and limits", response_model=HealthOut,
             responses=guarded)
    def health() -> HealthOut:
        with lock.reading():
            info = {k: v for k, v in index.info().items() if k != "source"}  # no server paths in responses
        shape = predictor.input_shape
        return HealthOut(status="ok", version=version, runtime=predictor.runtime, model=predictor.fingerprint,
                         embedding_dim=predictor.embedding_dim, input_shape=list(shape) if shape else None,
                         index=IndexOut(**info), max_upload_bytes=upload_limit, max_pixels=pixel_limit,
                         max_request_bytes=upload_limit + 4 * pixel_limit, max_top_k=limits.top_k,
                         workers=limits.workers, queue=limits.queue)

    @app.post("/embed", response_model=EmbedOut, summary="Embed one image", responses={**UPLOAD_ERRORS, **guarded})
    async def embed(request: Request, file: UploadFile = File(..., description="one image file")) -> EmbedOut:
        vec = (await run_limited(embed_bytes, await read_upload(request, file)))[0]
        return EmbedOut(dim=len(vec), l2_normalized=predictor.normalized, embedding=vec.tolist())

    def search_bytes(data: bytes, top_k: int):
        start = time.perf_counter()
        vector = embed_bytes(data)
        with lock.reading():
            hits = index.search(vector, k=top_k)[0]
        return hits, (time.perf_counter() - start) * 1000

    @app.post("/search", response_model=SearchOut, summary="Nearest gallery images of an uploaded image",
              responses={**UPLOAD_ERRORS, **guarded})
    async def search(request: Request, file: UploadFile = File(..., description="the query image"),
                     top_k: int = Query(10, ge=1, le=limits.top_k, description="number of hits")) -> SearchOut:
        hits, took = await run_limited(search_bytes, await read_upload(request, file), top_k)
        out = [HitOut.of(h.id, h.label, h.label_name, h.path, rank=r, score=h.score)
               for r, h in enumerate(hits, start=1)]
        return SearchOut(metric=index.metric, score_meaning=score_meaning, top_k=top_k, hits=out,
                         took_ms=round(took, 3))

    return run_limited


def _add_gallery_routes(app: FastAPI, index: Any, lock: IndexLock, guarded: Dict[Union[int, str], Dict[str, Any]]) -> None:
    """``/images/{id}`` (only paths stored in the index are ever served), the page and its static files."""

    def gallery_path(item_id: int) -> Optional[str]:
        """The stored path of ``item_id``: a stable id where the index has them (``path_of``), else a row."""
        path_of = getattr(index, "path_of", None)
        if path_of is not None and -2 ** 63 <= item_id < 2 ** 63:
            try:
                return path_of(item_id)
            except (UserError, KeyError, IndexError):
                pass
        elif path_of is None and 0 <= item_id < len(index):
            return index.paths[item_id]
        raise HTTPException(404, f"no gallery item {item_id} in the index ({len(index)} items)")

    @app.get("/images/{item_id}", summary="A gallery image of the index", response_class=FileResponse,
             responses={200: {"description": "the gallery image file",
                              "content": {"image/*": {}, "application/octet-stream": {}}},
                        404: _error("no such gallery item, or its file is gone"),
                        422: {"model": ValidationErrorOut, "description": "the id is not an integer"}, **guarded})
    def image(item_id: int) -> FileResponse:
        with lock.reading():
            path = gallery_path(item_id)  # the id is the sole input
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


def default_allowed_hosts(bind: str) -> Optional[List[str]]:
    """The ``Host`` names a server bound to ``bind`` answers by default: the loopback names (and the
    bound address) on loopback, any (``None``) beyond it."""
    if not is_loopback(bind):
        return None
    return list(dict.fromkeys([*LOOPBACK_NAMES, bind.strip("[]").lower()]))
