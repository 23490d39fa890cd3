"""The server's ASGI middlewares, outermost first: :class:`HostGuard` (the ``Host`` header),
:class:`ApiKeyGuard` (the API key for everything but the page shell), :class:`WriteGuard` (the key
for changes, from every client) and :class:`UploadGate` (sizes, capacity and time of upload bodies).
Each answers JSON ``{"detail": ...}`` before the request reaches a route.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Any, Dict, Optional, Sequence

import anyio
from fastapi.responses import JSONResponse

PUBLIC_PATHS = ("/", "/static/")  # the page shell (no data): served without the API key
MULTIPART_OVERHEAD = 64 * 1024  # boundary lines and part headers around the file
RETRY_AFTER_S = 1
#: bodies being received at once, per processing slot: slow senders wait here, not in the worker queue
READERS_PER_SLOT = 2


def json_error(status: int, detail: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def host_name(host: str) -> str:
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


def sent_key(headers: Dict[bytes, bytes]) -> bytes:
    """The key a request carries: ``X-API-Key``, else ``Authorization: Bearer``."""
    auth = headers.get(b"authorization", b"")
    return headers.get(b"x-api-key") or (auth[7:].strip() if auth[:7].lower() == b"bearer " else b"")


class HostGuard:
    """Answer 400 to a ``Host`` header outside ``allowed`` (``*.example.com`` matches subdomains), so a
    DNS-rebinding page cannot read the service through the user's browser."""

    def __init__(self, app: Any, allowed: Sequence[str]) -> None:
        self.app, self.allowed = app, [h.lower() for h in allowed]

    def _allowed(self, name: str) -> bool:
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.allowed)

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self._allowed(host_name(host)):
                return await json_error(400, f"Host {host!r} is not served here (allowed: {', '.join(self.allowed)}); "
                                             "add it with --allowed-hosts")(scope, receive, send)
        return await self.app(scope, receive, send)


class ApiKeyGuard:
    """Every client must send ``key`` (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``) for anything
    but the page shell; with ``loopback_exempt``, clients on this machine need not.

    Loopback is not exempt by default: a same-host relay (``ssh -L``, a reverse proxy that adds no
    ``X-Forwarded-For``) makes every remote client look local."""

    def __init__(self, app: Any, key: str, loopback_exempt: bool = False) -> None:
        self.app, self.key, self.loopback_exempt = app, key.encode(), loopback_exempt

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not (self.loopback_exempt and is_loopback((scope.get("client") or (None,))[0])):
            path = scope["path"]
            public = scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith(PUBLIC_PATHS[1]))
            if not public and not hmac.compare_digest(sent_key(dict(scope["headers"])), self.key):
                return await json_error(401, "this server needs its API key: send it in the X-API-Key header",
                                        {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


class WriteGuard:
    """``POST /items`` and ``DELETE /items/...`` need ``key`` from every client (401), and a server
    without one refuses them (403). Checked before the upload gate reads the body."""

    def __init__(self, app: Any, key: Optional[str], routes: Sequence[str]) -> None:
        self.app, self.key, self.routes = app, key.encode() if key else None, tuple(routes)

    def _is_write(self, scope: Dict[str, Any]) -> bool:
        path = scope["path"]
        return (scope["method"] == "POST" and path in self.routes) or (
            scope["method"] == "DELETE" and path.startswith(tuple(r + "/" for r in self.routes)))

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self._is_write(scope):
            if self.key is None:
                return await json_error(403, "this server is read-only: start it with an API key (deepmetric serve "
                                             "--api-key-env NAME) to add or remove items")(scope, receive, send)
            if not hmac.compare_digest(sent_key(dict(scope["headers"])), self.key):
                return await json_error(401, "adding or removing items needs the server's API key: send it in the "
                                             "X-API-Key header", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


class UploadGate:
    """For the upload routes: the body is read here, whole, before the route sees it.

    - 413 for a body above ``file_limit`` (plus the multipart framing allowance): from
      ``Content-Length`` before reading, or as soon as a chunked body passes it;
    - 503 with ``Retry-After`` when ``capacity`` uploads are already being processed (before the body
      is read), or ``READERS_PER_SLOT x capacity`` bodies are already being received;
    - 408 when a body has not arrived whole within ``read_timeout`` seconds (the connection closes).

    So slow senders hold reading slots for at most ``read_timeout`` each and never the processing
    slots that searches need, and a server that stops waits for no upload longer than that.
    """

    def __init__(self, app: Any, file_limit: int, capacity: int, read_timeout: float, routes: Sequence[str]) -> None:
        self.app, self.file_limit, self.capacity, self.routes = app, file_limit, capacity, tuple(routes)
        self.limit, self.read_timeout = file_limit + MULTIPART_OVERHEAD, read_timeout
        self.active = self.reading = 0  # touched on the event loop only

    def _busy(self) -> Optional[JSONResponse]:
        readers = READERS_PER_SLOT * max(self.capacity, 1)
        if self.active >= self.capacity:
            what = f"{self.capacity} image requests are in progress"
        elif self.reading >= readers:
            what = f"{readers} uploads are still arriving"
        else:
            return None
        return json_error(503, f"busy: {what}; retry in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})

    def _too_large(self, size: str) -> JSONResponse:
        return json_error(413, f"upload of {size} bytes is above the limit of {self.file_limit} bytes "
                               "(max_upload_bytes)", {"Connection": "close"})

    async def _body(self, receive: Any) -> Any:
        """The body (bytes), a refusal (a response) or None (the client left)."""
        chunks, size, more = [], 0, True
        with anyio.move_on_after(self.read_timeout):
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    return self._too_large(f"more than {self.limit}")
                chunks.append(chunk)
                more = message.get("more_body", False)
            return b"".join(chunks)
        return json_error(408, f"the upload did not arrive whole within {self.read_timeout:g} s; send it faster "
                               "or smaller", {"Connection": "close"})

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(length.decode())(scope, receive, send)
        refusal = self._busy()
        if refusal is not None:
            return await refusal(scope, receive, send)
        self.reading += 1
        try:
            body = await self._body(receive)
        finally:
            self.reading -= 1
        if body is None:
            return None
        if not isinstance(body, bytes):
            return await body(scope, receive, send)
        refusal = self._busy() if self.active >= self.capacity else None  # filled while this one was read
        if refusal is not None:
            return await refusal(scope, receive, send)
        self.active += 1
        try:
            replayed = False

            async def replay() -> Dict[str, Any]:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send)
        finally:
            self.active -= 1
