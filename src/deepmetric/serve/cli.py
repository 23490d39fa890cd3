"""``deepmetric serve``: load a model and an index once, then serve the HTTP API and search page.

An ``.onnx`` model is served with onnxruntime, numpy and Pillow only (the ``onnx`` extra): PyTorch
is not imported. A run or checkpoint directory needs PyTorch (the ``serve`` extra).

Settings are checked, and the address bound, before anything is loaded: a bad value or a busy port is
one line and exit code 2. The server stops on SIGTERM or Ctrl-C: it stops accepting, waits for the
requests in progress at most ``--shutdown-timeout`` seconds (an upload has at most ``--read-timeout``
to arrive), then saves the index and releases it; a second signal stops the waiting, never the save.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

from ..core.errors import UserError

log = logging.getLogger("deepmetric")

API_KEY_ENV = "DEEPMETRIC_API_KEY"


def _require_web_stack() -> None:
    missing = []
    for package, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python-multipart", "python_multipart")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(f"serving needs {', '.join(missing)}: pip install 'deepmetric[onnx]' to serve an .onnx "
                        "model, or 'deepmetric[serve]' for checkpoints (with PyTorch)")


def _hosts(value: Optional[str], bind: str) -> Optional[List[str]]:
    from .app import default_allowed_hosts

    if value is None:
        return default_allowed_hosts(bind)
    hosts = [h.strip() for h in value.split(",") if h.strip()]
    return None if "*" in hosts else hosts


def check_args(args: argparse.Namespace) -> None:
    """Every setting, before the model is loaded (:class:`UserError` naming the option)."""
    from .app import check_settings

    check_settings(max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, max_top_k=args.max_top_k,
                   workers=args.workers, queue=args.queue, save_every=args.save_every, read_timeout=args.read_timeout,
                   queue_timeout=args.queue_timeout)
    if args.shutdown_timeout <= 0:
        raise UserError(f"--shutdown-timeout must be a number above 0, got {args.shutdown_timeout!r}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be an integer of at least 1, got {args.threads!r}")
    items = Path(args.items_dir or default_items_dir(args.index))
    if items.exists() and not items.is_dir():
        raise UserError(f"--items-dir {items}: is a file, not a folder; name a folder for the uploaded images")


def default_items_dir(index: str) -> str:
    """Where uploaded images go by default: ``INDEX.items`` beside an index file; for a database
    collection, what its class says (``gallery.db.items`` beside a Milvus Lite file)."""
    from ..inference.stores import store_class, store_of

    scheme = store_of(index)
    return f"{index}.items" if scheme is None else store_class(scheme).default_items_dir(index)


def build_app(args: argparse.Namespace) -> Any:
    """The app ``deepmetric serve`` runs, from its parsed arguments (model and index loaded)."""
    _require_web_stack()
    check_args(args)
    from ..inference.predictor import Predictor
    from .app import create_app

    onnx = str(args.checkpoint).lower().endswith(".onnx")
    if args.threads and not onnx and args.runtime == "torch":
        import torch

        torch.set_num_threads(args.threads)
    from ..inference.index import SearchIndex
    from ..inference.stores import open_index, store_of

    index: Any = Path(args.index)
    if store_of(args.index) is not None:  # a database collection: reached (or refused) before the model loads
        index = open_index(args.index)
    elif not index.is_file():
        SearchIndex.load(args.index)  # the error that says what is there instead
    try:
        predictor = Predictor.load(args.checkpoint, device=args.device, runtime=args.runtime, threads=args.threads)
        api_key = api_key_of(args)
        allowed = _hosts(args.allowed_hosts, args.host)
        items_dir = args.items_dir or default_items_dir(args.index)
        return create_app(predictor, index, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                          max_top_k=args.max_top_k, workers=args.workers, queue=args.queue, allowed_hosts=allowed,
                          api_key=api_key, loopback_without_key=args.allow_loopback_without_key, items_dir=items_dir,
                          save_every=args.save_every, read_timeout=args.read_timeout,
                          queue_timeout=args.queue_timeout)
    except BaseException:
        if not isinstance(index, Path):
            index.close()
        raise


def api_key_of(args: argparse.Namespace, warn: bool = True) -> Optional[str]:
    """The server's key: the environment variable ``--api-key-env`` names (default
    ``DEEPMETRIC_API_KEY``), or the older ``--api-key`` (visible to other users in the process list)."""
    name = getattr(args, "api_key_env", None)
    if name and not os.environ.get(name):
        raise UserError(f"--api-key-env {name}: the environment variable {name} is not set (or empty); "
                        f"export {name}=<key> first")
    if getattr(args, "api_key", None):
        if warn:
            log.warning("--api-key puts the key in the process list, where other users can read it; "
                        "set it in an environment variable and pass --api-key-env NAME instead")
        return args.api_key
    return os.environ.get(name or API_KEY_ENV) or None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (uvicorn serves it): a busy port or a bad address is one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address this machine can listen on ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # clients that come before uvicorn accepts wait in the backlog, not refused
    except OSError as e:
        sock.close()
        busy = " (another server uses that port: pick another with --port)" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}{busy}") from None
    return sock


def run_server(app: Any, sock: socket.socket, log_level: str = "info", shutdown_timeout: float = 10.0) -> None:
    """Serve ``app`` on the bound ``sock`` until SIGTERM or SIGINT; then wait for the requests in progress
    at most ``shutdown_timeout`` seconds and close the gallery (the index saved), even when a second
    signal cut the wait short (uvicorn then skips the app's lifespan)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:
                self.force_exit = True  # a second signal, of either kind: stop waiting for connections
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's raises the signals again once it has stopped, which on a forced stop prints a
            # KeyboardInterrupt traceback; the stop is complete (and saved) here, so it ends normally
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: Any = None) -> None:
            try:
                await super().shutdown(sockets)
                if self.force_exit:  # uvicorn left the connections and the app's lifespan: end them cleanly
                    for connection in list(self.server_state.connections):
                        transport = getattr(connection, "transport", None)
                        if transport is not None:
                            transport.close()  # a request still reading sees the client leave
                    await self.lifespan.shutdown()
            finally:
                app.state.items.close()

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    Server(config).run(sockets=[sock])


def cmd_serve(args: argparse.Namespace) -> int:
    _require_web_stack()
    check_args(args)
    from .app import is_loopback

    sock = bind(args.host, args.port)
    try:
        app = build_app(args)
    except BaseException:
        sock.close()
        raise
    predictor, index = app.state.predictor, app.state.index
    keyed = bool(api_key_of(args, warn=False))
    if not is_loopback(args.host):
        if not keyed:
            log.warning("serving on %s without an API key: anyone who can reach this address can search and "
                        "download the gallery images (set %s, or name another variable with --api-key-env)", args.host, API_KEY_ENV)
        if args.allowed_hosts is None:
            log.warning("serving on %s for any Host header; name the host names clients use with --allowed-hosts",
                        args.host)
    writable = (f"; POST /items and DELETE /items/{{id}} with the API key change {args.index}"
                if keyed else "; read-only (no API key)")
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {len(index)} {'centroids' if index.mode == 'centroids' else 'images'} "
          f"({index.backend_name}, {index.metric}) with {predictor.runtime} at http://{host}:{port}/"
          f"{writable}", flush=True)
    run_server(app, sock, args.log_level, args.shutdown_timeout)
    return 0


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535 (0: any free port), got {value!r}")
    return port


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``deepmetric`` parser."""
    p = subparsers.add_parser("serve", help="HTTP search API and web page for an index")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="exported .onnx file (served without PyTorch), or a run or checkpoint directory")
    p.add_argument("--index", required=True, help="index file from 'deepmetric index build', or a Milvus collection: "
                   "milvus://gallery.db (Milvus Lite), milvus://host:19530/collection (a Milvus server)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port; default 8000)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="for a checkpoint: run it with PyTorch or (exported in memory) onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest accepted image, width x height (default: 256 x the model's input pixels, "
                        "at least 4096 x 4096)")
    p.add_argument("--max-top-k", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime intra-op threads")
    p.add_argument("--workers", type=int, default=None,
                   help="image requests processed at once (default: CPU count, at most 4)")
    p.add_argument("--queue", type=int, default=16,
                   help="image requests that may wait beyond --workers; more get 503 with Retry-After (default 16)")
    p.add_argument("--queue-timeout", type=float, default=30.0, metavar="S",
                   help="longest a request waits for a worker before it gets 503 (default 30)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="S",
                   help="an upload's body must arrive whole within S seconds, else 408 (default 30)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, wait at most S seconds for requests in progress, then save and "
                        "exit (default 10; a second signal stops the waiting)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names served ('*' any; '*.example.com' subdomains); default: "
                        "the loopback names when --host is loopback, else any")
    p.add_argument("--api-key-env", default=None, metavar="NAME",
                   help=f"environment variable holding the API key (default {API_KEY_ENV}): every client must "
                        "send it (X-API-Key header) to search, and to add or remove items (POST /items, "
                        "DELETE /items/{id}); without a key the server is read-only")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # older, in clear: use --api-key-env
    p.add_argument("--allow-loopback-without-key", action="store_true",
                   help="let clients on this machine search without the key (only where no relay, such as ssh -L "
                        "or a reverse proxy, forwards other clients from this machine); changes still need it")
    p.add_argument("--items-dir", default=None, metavar="DIR",
                   help="where images added with POST /items are kept (default: INDEX.items next to the index; "
                        "for Milvus Lite gallery.db.items, for a Milvus server ./COLLECTION.items)")
    p.add_argument("--save-every", type=int, default=100, metavar="N",
                   help="rewrite the index file after every N changes and when the server stops (0: only then; "
                        "default 100). Every change is durable before it is acknowledged whatever N is: it is "
                        "appended to INDEX.wal first, which the next start replays")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
