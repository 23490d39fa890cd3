"""``deepmetric serve``: load a model and an index once, then serve the HTTP API and search page."""
from __future__ import annotations

import argparse
import ipaddress
import logging

from ..errors import UserError

log = logging.getLogger("deepmetric")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise UserError(f"serving needs the 'serve' extra ({e.name} is missing): pip install 'deepmetric[serve]'") from None
    from ..inference.index import SearchIndex
    from ..inference.predictor import Predictor

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    index = SearchIndex.load(args.index)
    predictor = Predictor.load(args.checkpoint, device=args.device, runtime=args.runtime, threads=args.threads)
    app = create_app(predictor, index, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                     max_top_k=args.max_top_k, workers=args.workers)
    if not _is_loopback(args.host):
        log.warning("serving on %s: anyone who can reach this address can search and download the gallery images",
                    args.host)
    print(f"serving {len(index)} {'centroids' if index.mode == 'centroids' else 'images'} "
          f"({index.backend_name}, {index.metric}) with {predictor.runtime} at http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``deepmetric`` parser."""
    p = subparsers.add_parser("serve", help="HTTP search API and web page for an index")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or exported .onnx file")
    p.add_argument("--index", required=True, help="index file from 'deepmetric index build'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest accepted image (width x height; default PIL's MAX_IMAGE_PIXELS)")
    p.add_argument("--max-top-k", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime intra-op threads")
    p.add_argument("--workers", type=int, default=None,
                   help="image requests processed at once (default: CPU count, at most 4); the rest queue")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
