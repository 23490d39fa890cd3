"""``deepmetric serve``: load a model and an index once, then serve the HTTP API and search page.

An ``.onnx`` model is served with onnxruntime, numpy and Pillow only (the ``onnx`` extra): PyTorch
is not imported. A run or checkpoint directory needs PyTorch (the ``serve`` extra).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
from typing import Any, List, Optional

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


def build_app(args: argparse.Namespace) -> Any:
    """The app ``deepmetric serve`` runs, from its parsed arguments (model and index loaded)."""
    _require_web_stack()
    from ..inference.index import SearchIndex
    from ..inference.predictor import Predictor
    from .app import create_app

    onnx = str(args.checkpoint).lower().endswith(".onnx")
    if args.threads and not onnx and args.runtime == "torch":
        import torch

        torch.set_num_threads(args.threads)
    index = SearchIndex.load(args.index)
    predictor = Predictor.load(args.checkpoint, device=args.device, runtime=args.runtime, threads=args.threads)
    api_key = api_key_of(args)
    allowed = _hosts(args.allowed_hosts, args.host)
    items_dir = args.items_dir or f"{args.index}.items"
    return create_app(predictor, index, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                      max_top_k=args.max_top_k, workers=args.workers, queue=args.queue, allowed_hosts=allowed,
                      api_key=api_key, items_dir=items_dir, index_path=args.index, save_every=args.save_every)


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


def cmd_serve(args: argparse.Namespace) -> int:
    _require_web_stack()
    import uvicorn

    from .app import is_loopback

    app = build_app(args)

    predictor, index = app.state.predictor, app.state.index
    if not is_loopback(args.host):
        if not api_key_of(args, warn=False):
            log.warning("serving on %s without an API key: anyone who can reach this address can search and "
                        "download the gallery images (set %s, or name another variable with --api-key-env)", args.host, API_KEY_ENV)
        if args.allowed_hosts is None:
            log.warning("serving on %s for any Host header; name the host names clients use with --allowed-hosts",
                        args.host)
    writable = (f"; POST /items and DELETE /items/{{id}} with the API key change {args.index}"
                if api_key_of(args, warn=False) else "; read-only (no API key)")
    print(f"serving {len(index)} {'centroids' if index.mode == 'centroids' else 'images'} "
          f"({index.backend_name}, {index.metric}) with {predictor.runtime} at http://{args.host}:{args.port}/"
          f"{writable}")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``deepmetric`` parser."""
    p = subparsers.add_parser("serve", help="HTTP search API and web page for an index")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="exported .onnx file (served without PyTorch), or a run or checkpoint directory")
    p.add_argument("--index", required=True, help="index file from 'deepmetric index build'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
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
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names served ('*' any; '*.example.com' subdomains); default: "
                        "the loopback names when --host is loopback, else any")
    p.add_argument("--api-key-env", default=None, metavar="NAME",
                   help=f"environment variable holding the API key (default {API_KEY_ENV}): clients beyond this "
                        "machine must send it (X-API-Key header) to search, and every client to add or remove "
                        "items (POST /items, DELETE /items/{id}); without a key the server is read-only")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # older, in clear: use --api-key-env
    p.add_argument("--items-dir", default=None, metavar="DIR",
                   help="where images added with POST /items are kept (default: INDEX.items next to the index)")
    p.add_argument("--save-every", type=int, default=1, metavar="N",
                   help="save the index file (atomically) after every N changes; 0: only when the server stops "
                        "(default 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
