"""Load test of ``deepmetric serve``: a real uvicorn process on a loopback socket, many concurrent clients.

    python benchmarks/bench_serve.py                      # 32 clients, 2,000 /search requests per runtime
    python benchmarks/bench_serve.py --runtimes onnx-file --requests 500

Builds a tiny model (small CNN, 16-d, 32x32 input) and a gallery of ``--gallery`` real JPEGs in a
temporary folder, embeds and indexes them (exact backend), then for each runtime, measured in the
same run: ``torch`` (the checkpoint), ``onnx`` (the checkpoint exported in memory) and ``onnx-file``
(an exported ``.onnx`` file: the path that never imports PyTorch), starts ``python -m deepmetric
serve`` on 127.0.0.1 and sends ``--requests`` ``POST /search?top_k=10`` uploads from ``--clients``
concurrent httpx clients, within ``--time-cap`` seconds. Prints p50/p99 latency, requests per
second, the 503 answers of a full queue (``--queue``; the default queue holds every client, so none)
and the count of 5xx other than 503 (which must be zero).

Then the decompression-bomb ratio (issue 13): the p50 of single ``/search`` requests alone, and
while four all-black 9000x9000 PNGs (236 KB each) are sent at once with each; the ratio should stay
near 1 (it was 37x before the pixel limit followed the model's input).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TINY = ["model.backbone=small_cnn", "model.in_chans=3", "model.embedding_dim=16",
        "data.transform=imagenet", "data.image_size=[32,32]"]


def build_fixture(work: Path, n_gallery: int) -> tuple[Path, Path, list[bytes]]:
    import torch

    from deepmetric.config import load_config
    from deepmetric.data.synthetic import make_image_folder
    from deepmetric.engine.build import build_model
    from deepmetric.engine.checkpoint import save_checkpoint
    from deepmetric.inference.index import SearchIndex
    from deepmetric.inference.predictor import Predictor, list_inputs

    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    ckpt = save_checkpoint(work / "ckpt", cfg=cfg, model=build_model(cfg), losses=torch.nn.ModuleList(),
                           optimizers={}, state={"step": 0})
    per_class = 50
    folder = make_image_folder(work / "gallery", n_classes=max(1, n_gallery // per_class), per_class=per_class,
                               size=48)
    predictor = Predictor.from_checkpoint(ckpt)
    inputs = list_inputs(folder)
    es = predictor.embed_list(inputs.paths, inputs.labels, batch_size=128, progress=False)
    index_path = SearchIndex.build(es, backend="exact", class_names=inputs.class_names,
                                   source={"model": predictor.fingerprint}).save(work / "gallery.index")
    rng = np.random.default_rng(0)
    queries = [Path(inputs.paths[i]).read_bytes() for i in rng.choice(len(inputs.paths), 64, replace=False)]
    return ckpt, index_path, queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_onnx(ckpt: Path, work: Path) -> Path:
    from deepmetric.inference.export import export_checkpoint

    return export_checkpoint(ckpt, "onnx", work / "model.onnx").path


def start_server(model: Path, index: Path, runtime: str, port: int, threads: int, queue: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "deepmetric", "serve", "--model", str(model), "--index", str(index),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--threads", str(threads),
           "--queue", str(queue)] + ([] if str(model).endswith(".onnx") else ["--runtime", runtime])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("server did not become healthy")


async def load_test(base: str, queries: list[bytes], clients: int, requests: int, time_cap: float) -> dict:
    import httpx

    latencies, statuses, errors = [], [], 0
    issued = 0
    deadline = time.monotonic() + time_cap

    async def worker(client: httpx.AsyncClient, wid: int) -> None:
        nonlocal issued, errors
        while issued < requests and time.monotonic() < deadline:
            i = issued
            issued += 1
            files = {"file": ("q.jpg", queries[i % len(queries)], "image/jpeg")}
            t = time.perf_counter()
            try:
                r = await client.post("/search", params={"top_k": 10}, files=files)
                statuses.append(r.status_code)
                latencies.append(time.perf_counter() - t)
            except httpx.HTTPError:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, w) for w in range(clients)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"done": len(statuses), "wall": wall, "rps": len(statuses) / wall,
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "503": sum(s == 503 for s in statuses), "5xx": sum(s >= 500 and s != 503 for s in statuses),
            "other_non_200": sum(s != 200 and s < 500 for s in statuses),
            "transport_errors": errors, "capped": len(statuses) < requests}


def black_png(side: int = 9000) -> bytes:
    """An all-black ``side x side`` RGB PNG, written row by row (9000: about 236 KB, 243 MB of pixels)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row = zlib.compressobj(9), b"\0" * (1 + 3 * side)
    idat = b"".join([*(z.compress(row) for _ in range(side)), z.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


async def bomb_ratio(base: str, query: bytes, bomb: bytes, rounds: int = 15) -> dict:
    """p50 of one /search alone, and with four bombs sent at the same moment."""
    import httpx

    async def timed(client, data: bytes, name: str):
        t = time.perf_counter()
        mime = "image/png" if name.endswith(".png") else "image/jpeg"
        r = await client.post("/search", params={"top_k": 10}, files={"file": (name, data, mime)})
        return r.status_code, time.perf_counter() - t

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        alone = [(await timed(client, query, "q.jpg"))[1] for _ in range(rounds)]
        loaded, bomb_status, bomb_time = [], [], []
        for _ in range(rounds):
            got = await asyncio.gather(timed(client, query, "q.jpg"), *(timed(client, bomb, "b.png") for _ in range(4)))
            loaded.append(got[0][1])
            bomb_status += [s for s, _ in got[1:]]
            bomb_time += [t for _, t in got[1:]]
    a, b = float(np.median(alone)) * 1000, float(np.median(loaded)) * 1000
    return {"alone_ms": a, "with_bombs_ms": b, "ratio": b / a, "bomb_p50_ms": float(np.median(bomb_time)) * 1000,
            "bomb_statuses": sorted(set(bomb_status))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", type=int, default=3000, help="gallery images (indexed vectors)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--time-cap", type=float, default=300.0, help="seconds per runtime before giving up")
    p.add_argument("--runtimes", default="torch,onnx,onnx-file")
    p.add_argument("--threads", type=int, default=2, help="server's torch/onnxruntime intra-op threads")
    p.add_argument("--queue", type=int, default=None, help="server's --queue (default: --clients, no 503)")
    args = p.parse_args()

    rows, bombs = [], []
    queue = args.clients if args.queue is None else args.queue
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        t = time.perf_counter()
        ckpt, index, queries = build_fixture(Path(tmp), args.gallery)
        onnx_file = export_onnx(ckpt, Path(tmp))
        bomb = black_png()
        print(f"fixture: {args.gallery} gallery images indexed in {time.perf_counter() - t:.1f}s; "
              f"{args.clients} clients, {args.requests} requests per runtime, cpu count {os.cpu_count()}")
        for runtime in args.runtimes.split(","):
            port = free_port()
            model = onnx_file if runtime == "onnx-file" else ckpt
            proc = start_server(model, index, runtime, port, args.threads, queue)
            try:
                base = f"http://127.0.0.1:{port}"
                asyncio.run(wait_healthy(base, proc))
                asyncio.run(load_test(base, queries, args.clients, 64, 60))  # warm-up
                r = asyncio.run(load_test(base, queries, args.clients, args.requests, args.time_cap))
                b = asyncio.run(bomb_ratio(base, queries[0], bomb))
            finally:
                stop_server(proc)
            rows.append((runtime, r))
            bombs.append((runtime, b))
            print(f"{runtime}: {r}\n{runtime} bombs: {b}")

    print("\n| runtime | requests | clients | p50 ms | p99 ms | req/s | 503 (queue full) | other 5xx | other errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for runtime, r in rows:
        print(f"| {runtime} | {r['done']}{' (time cap)' if r['capped'] else ''} | {args.clients} | {r['p50']:.1f} | "
              f"{r['p99']:.1f} | {r['rps']:.1f} | {r['503']} | {r['5xx']} | {r['other_non_200'] + r['transport_errors']} |")
    print("\n| runtime | /search p50 alone ms | with 4 bombs ms | ratio | bomb answer p50 ms | bomb statuses |")
    print("|---|---|---|---|---|---|")
    for runtime, b in bombs:
        print(f"| {runtime} | {b['alone_ms']:.1f} | {b['with_bombs_ms']:.1f} | {b['ratio']:.2f} | "
              f"{b['bomb_p50_ms']:.1f} | {b['bomb_statuses']} |")
    bad = sum(r["5xx"] for _, r in rows)
    print("\n5xx answers other than 503: " + ("none" if not bad else f"{bad} (must be zero)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
