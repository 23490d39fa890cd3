"""The search service: :func:`create_app` turns a loaded :class:`Predictor` and :class:`SearchIndex` into a
FastAPI app.

| route | in | out |
|---|---|---|
| ``GET /`` | | the search page (static HTML + JS, no external resources) |
| ``GET /health`` | | model, index and limits (never waits for a change to the index) |
| ``POST /embed`` | multipart ``file`` (one image) | ``{"embedding": [...], "dim", "l2_normalized"}`` |
| ``POST /search?top_k=10`` | multipart ``file`` | ``{"hits": [{"rank", "id", "score", "label", "label_name", "name", "image_url"}], ...}`` |
| ``GET /images/{id}`` | gallery id | the gallery image file stored in the index (404 for any other id) |
| ``POST /items``, ``DELETE /items/{id}`` | images (+ labels), an id | add to / remove from the live index, with the API key (:mod:`.items`) |
| ``GET /docs``, ``/openapi.json`` | | the OpenAPI schema (every status below is in it) and its viewer |

Every error is JSON ``{"detail": "<message>"}`` (422 adds ``errors``), never a 500:

| status | when |
|---|---|
| 400 | empty, corrupt or truncated image; more than one file; a ``Host`` not in ``allowed_hosts`` |
| 401 | ``api_key`` is set and the client did not send it (``X-API-Key`` or ``Authorization: Bearer``); loopback clients too unless ``loopback_without_key`` (``/items`` always) |
| 403 | ``/items`` on a server without ``api_key`` (read-only) |
| 408 | an upload body that did not arrive whole within ``read_timeout`` seconds |
| 413 | body above ``max_upload_bytes`` (refused before it is read), image above ``max_pixels`` (from its header) |
| 415 | not an image |
| 422 | missing ``file`` field, bad ``top_k``, id or label, a non-finite embedding |
| 503 | ``workers + queue`` image requests already in the server, or one waited ``queue_timeout`` s for a worker: retry after ``Retry-After`` seconds; a change while the server stops |
| 500, 507 | a change the disk refused (507: no space): nothing was changed (:mod:`.gallery`) |

Bounded work per request: an upload is at most ``max_upload_bytes``; its pixels are checked against
``max_pixels`` (default sized to the model's input, :func:`~deepmetric.inference.preprocess.default_max_pixels`)
before decoding; JPEGs decode at reduced scale; every image is brought to the model's input size.
So a request holds at most ``max_upload_bytes + 4 * max_pixels`` bytes (``max_request_bytes`` in
``/health``), and at most ``workers + queue`` requests are in the server at once: the rest get 503
before their body is read.

Bodies are received by :class:`~.guards.UploadGate` before a worker is taken, each within
``read_timeout`` seconds, in at most ``2 x (workers + queue)`` at once: slow senders never hold the
workers that searches need.

Concurrency: decoding, embedding and search run in worker threads, at most ``workers`` at a time and
in arrival order, so the event loop is never starved and latency grows evenly with load. The forward
pass runs one at a time under the predictor's lock (its intra-op threads already use the cores).
Changes to the index and its durability are :mod:`.gallery`'s.
"""
from __future__ import annotations

import logging
import mimetypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import anyio
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ..core.errors import UserError
from . import items
from .gallery import LiveGallery
from .guards import ApiKeyGuard, HostGuard, UploadGate, WriteGuard, is_loopback, json_error

log = logging.getLogger("deepmetric")

STATIC = Path(__file__).parent / "static"
UPLOAD_ROUTES = ("/embed", "/search")
RETRY_AFTER_S = 1
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
IMAGE_CHUNK = 256 * 1024

__all__ = ["create_app", "check_settings", "default_allowed_hosts", "is_loopback"]


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
    408: _error("the upload did not arrive whole within read_timeout seconds"),
    413: _error("upload above max_upload_bytes, or image above max_pixels (refused from its header)"),
    415: _error("not an image: JPEG, PNG, WebP, BMP, GIF, TIFF or PPM"),
    422: {"model": ValidationErrorOut, "description": "missing 'file' field or invalid query parameter"},
    503: _error("the server holds workers + queue image requests already, or none was free within queue_timeout; "
                "retry later",
                headers={"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}),
}


def check_settings(*, max_upload_mb: float = 10.0, max_pixels: Optional[int] = None, max_top_k: int = 100,
                   workers: Optional[int] = None, queue: int = 16, save_every: int = 100, read_timeout: float = 30.0,
                   queue_timeout: float = 30.0) -> None:
    """Refuse a setting no server can run with, naming its ``deepmetric serve`` option (:class:`UserError`)."""
    def number(value: Any, flag: str, lowest: float, integer: bool, strict: bool = False) -> None:
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool) and value == value and value != float("inf")
        if not ok or (value <= lowest if strict else value < lowest):
            expected = f"{'an integer' if integer else 'a number'} {'above' if strict else 'of at least'} {lowest:g}"
            raise UserError(f"--{flag} must be {expected}, got {value!r}")

    number(max_upload_mb, "max-upload-mb", 0, False, strict=True)
    if max_pixels is not None:
        number(max_pixels, "max-pixels", 1, True)
    number(max_top_k, "max-top-k", 1, True)
    if workers is not None:
        number(workers, "workers", 1, True)
    number(queue, "queue", 0, True)
    number(save_every, "save-every", 0, True)
    number(read_timeout, "read-timeout", 0, False, strict=True)
    number(queue_timeout, "queue-timeout", 0, False, strict=True)


def create_app(predictor: Any, index: Any, *, max_upload_mb: float = 10.0, max_pixels: Optional[int] = None,
               max_top_k: int = 100, workers: Optional[int] = None, queue: int = 16,
               allowed_hosts: Optional[Sequence[str]] = None, api_key: Optional[str] = None,
               loopback_without_key: bool = False, items_dir: Optional[Union[str, Path]] = None,
               index_path: Optional[Union[str, Path]] = None, save_every: int = 100, read_timeout: float = 30.0,
               queue_timeout: float = 30.0, title: str = "deepmetric search") -> FastAPI:
    """A FastAPI app serving ``index`` with ``predictor`` (loaded once, by the caller).

    ``index``: a :class:`~deepmetric.inference.index.SearchIndex`, or the path of an index file (then
    also ``index_path``), loaded with its change log once the server holds it. ``workers``: image
    requests processed at once (default: CPU count, at most 4); ``queue``: more that may wait (at most
    ``queue_timeout`` s each), beyond which uploads get 503; each upload body must arrive within
    ``read_timeout`` s. ``max_pixels``: largest accepted image (default sized to the model's input).
    ``allowed_hosts``: ``Host`` names served (``None``: any; ``deepmetric serve`` passes the loopback
    names when bound to loopback). ``api_key``: required from every client (this machine's own too,
    unless ``loopback_without_key``) for all but the page shell, and to change the index (``POST
    /items``, ``DELETE /items/{id}``; without a key the server is read-only). With a key and
    ``index_path`` every change is durable before it is acknowledged, and the file is rewritten every
    ``save_every`` changes and when the server stops (:mod:`.gallery`); uploaded images are kept in
    ``items_dir`` (None: no image). The app's lifespan closes the gallery (``app.state.items``).
    """
    from ..core import __version__

    check_settings(max_upload_mb=max_upload_mb, max_pixels=max_pixels, max_top_k=max_top_k, workers=workers,
                   queue=queue, save_every=save_every, read_timeout=read_timeout, queue_timeout=queue_timeout)
    gallery = _open_gallery(predictor, index, api_key, items_dir, index_path, save_every)
    index = gallery.index
    limits = _Limits(upload=int(max_upload_mb * 1024 * 1024), pixels=predictor.pixel_limit(max_pixels),
                     top_k=max_top_k, workers=int(workers or min(4, os.cpu_count() or 1)), queue=int(queue),
                     queue_timeout=float(queue_timeout))
    guarded: Dict[Union[int, str], Dict[str, Any]] = {}
    if allowed_hosts is not None:
        guarded[400] = _error("Host header not in the allowed hosts")
    if api_key:
        guarded[401] = _error("API key missing or wrong")
    app = FastAPI(title=title, version=__version__, lifespan=items.lifespan(gallery),
                  description="Image similarity search: embed an uploaded image and return the nearest gallery images.")
    app.state.predictor, app.state.index, app.state.items = predictor, index, gallery
    # added last = outermost: Host first, then the key, then the write key, then the upload gate
    app.add_middleware(UploadGate, file_limit=limits.upload, capacity=limits.workers + limits.queue,
                       read_timeout=float(read_timeout), routes=UPLOAD_ROUTES + items.ITEM_ROUTES)
    app.add_middleware(WriteGuard, key=api_key, routes=items.ITEM_ROUTES)
    if api_key:
        app.add_middleware(ApiKeyGuard, key=api_key, loopback_exempt=loopback_without_key)
    if allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed=list(allowed_hosts))
    _add_error_handlers(app)
    run_limited = _add_search_routes(app, predictor, gallery, limits, guarded, __version__)
    items.add_item_routes(app, predictor, gallery, run_limited, limits.pixels, limits.upload, UPLOAD_ERRORS,
                          documented=bool(api_key))
    _add_gallery_routes(app, gallery, guarded)
    return app


def _open_gallery(predictor: Any, index: Any, api_key: Optional[str], items_dir: Any, index_path: Any,
                  save_every: int) -> LiveGallery:
    """The gallery: a path is loaded (under the server's lock when it may change it) and checked
    against the model; a server without a key never writes, so it holds no lock."""
    from ..inference.index import SearchIndex
    from ..inference.stores import open_index, store_of

    if isinstance(index, (str, os.PathLike)) and store_of(index):
        index = open_index(index)  # a database collection: no file, change log or lock of ours
    elif isinstance(index, (str, os.PathLike)):
        index_path = index if index_path is None else index_path
        index = None if api_key else SearchIndex.load(index)
    path = None if index_path is None or not api_key else Path(index_path)
    if index is not None:
        try:
            predictor.check_index(index)
        except BaseException:
            index.close()
            raise
    gallery = LiveGallery.open(index, None if items_dir is None else Path(items_dir), path, save_every,
                               load=SearchIndex.load)
    if index is None:
        try:
            predictor.check_index(gallery.index)
        except BaseException:
            gallery.close()
            raise
    return gallery


@dataclass(frozen=True)
class _Limits:
    """What one server takes on: bytes per upload, pixels per image, hits per search, requests at once,
    seconds a request may wait for a worker."""

    upload: int
    pixels: int
    top_k: int
    workers: int
    queue: int
    queue_timeout: float


def _add_error_handlers(app: FastAPI) -> None:
    """Validation errors as one ``detail`` line (plus ``errors``), :class:`UserError` s with their status,
    anything else a JSON 500 (the traceback goes to the log, not to the client)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        summary = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
        return JSONResponse({"detail": summary or "invalid request", "errors": [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]},
            status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return json_error(getattr(exc, "status", 400), str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return json_error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _add_search_routes(app: FastAPI, predictor: Any, gallery: LiveGallery, limits: _Limits,
                       guarded: Dict[Union[int, str], Dict[str, Any]], version: str):
    """``/health``, ``/embed`` and ``/search``; returns the worker-pool runner the item routes share."""
    index, lock = gallery.index, gallery.lock
    upload_limit, pixel_limit = limits.upload, limits.pixels
    score_meaning = ("cosine similarity, higher is closer" if index.metric == "cosine"
                     else "squared L2 distance, lower is closer")
    # Decoding, embedding and search run in worker threads, at most `workers` at once and served in
    # arrival order (anyio's limiter is FIFO): a bounded queue instead of dozens of threads fighting
    # over the GIL, which starves the event loop and gives long latency tails.
    limiter = anyio.CapacityLimiter(limits.workers)

    async def run_limited(fn, *args):
        acquired = False
        with anyio.move_on_after(limits.queue_timeout):  # a bounded wait in the queue; never a cancelled worker
            await limiter.acquire()
            acquired = True
        if not acquired:
            raise HTTPException(503, f"busy: no worker was free within {limits.queue_timeout:g} s; retry later",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            limiter.release()

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
        info = gallery.info  # published after each change: never waits for the index lock; no source paths
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


def _add_gallery_routes(app: FastAPI, gallery: LiveGallery, guarded: Dict[Union[int, str], Dict[str, Any]]) -> None:
    """``/images/{id}`` (only paths stored in the index are ever served), the page and its static files."""
    index, lock = gallery.index, gallery.lock

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

    def chunks(f: Any) -> Iterator[bytes]:
        with f:
            for block in iter(lambda: f.read(IMAGE_CHUNK), b""):
                yield block

    @app.get("/images/{item_id}", summary="A gallery image of the index", response_class=StreamingResponse,
             responses={200: {"description": "the gallery image file",
                              "content": {"image/*": {}, "application/octet-stream": {}}},
                        404: _error("no such gallery item, or its file is gone"),
                        422: {"model": ValidationErrorOut, "description": "the id is not an integer"}, **guarded})
    def image(item_id: int) -> StreamingResponse:
        # Opened under the read lock: a removal unlinks the file under the write lock, after which the id
        # is gone; an open file stays readable whole, so a racing removal gives 200 and all bytes, or 404.
        with lock.reading():
            path = gallery_path(item_id)  # the id is the sole input
            if not path:
                raise HTTPException(404, f"gallery item {item_id} has no stored image path")
            try:
                f = open(path, "rb")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise HTTPException(404, f"the image file of gallery item {item_id} is no longer on disk") from None
        size = os.fstat(f.fileno()).st_size
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return StreamingResponse(chunks(f), media_type=media,
                                 headers={"Cache-Control": "max-age=3600", "Content-Length": str(size)})

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
