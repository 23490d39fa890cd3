"""Chaos run of a live gallery (issue 23): churn, SIGKILLs, and the cost of a delete to /health.

    python benchmarks/chaos_serve.py                                  # 60 s, 5 kills, exact and faiss-hnsw, 30k items
    python benchmarks/chaos_serve.py --seconds 20 --kills 2 --items 5000 --backends faiss-hnsw

Builds a tiny RGB model (``--dim``-d embeddings, exported to ONNX) and, per backend, a gallery of
``--items`` items (random unit vectors; their paths name a few real images), then runs ``python -m
deepmetric serve`` with an API key and ``--save-every 50`` through ``--kills + 1`` segments of
``--seconds / (kills + 1)`` seconds of churn: 3 adders (``POST /items``), 2 deleters (``DELETE``), 2
searchers and a ``/health`` prober every 20 ms. Each segment but the last ends in SIGKILL with requests
in flight, the last in SIGTERM; after each, the file and its change log are read as the next start reads
them. Counted:

- acknowledged adds lost (answered 201, absent after the crash; a delete of that item sent but not
  answered may have happened, so such items are not counted) and acknowledged deletes that came back
  (answered 200, present after the crash): both must be 0; unacknowledged changes are not counted;
- ``/health`` latency (p50, p99, max) of the probes that started while a delete was in flight, and the
  delete latency itself;
- the peer, measured in the same run: what a delete cost before tombstones, a full rebuild of the
  faiss-hnsw graph at this size (``SearchIndex.compact`` does exactly that), against the p99 of a delete.

Not a test: the numbers depend on the machine. The exact backend's server imports PyTorch (its ranking
is the evaluation's), so its restarts take seconds; they are not counted in the churn time.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KEY = "chaos-key"
AUTH = {"X-API-Key": KEY}


def build_model(work: Path, dim: int) -> Path:
    import torch

    from deepmetric.config import load_config
    from deepmetric.engine.build import build_model as build
    from deepmetric.engine.checkpoint import save_checkpoint
    from deepmetric.inference.export import export_checkpoint

    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=small_cnn", "model.in_chans=3", f"model.embedding_dim={dim}",
                             "data.transform=imagenet", "data.image_size=[32,32]"])
    ckpt = save_checkpoint(work / "ckpt", cfg=cfg, model=build(cfg), losses=torch.nn.ModuleList(), optimizers={},
                           state={"step": 0})
    return export_checkpoint(ckpt, "onnx", work / "model.onnx").path


def build_gallery(work: Path, model: Path, backend: str, items: int) -> Path:
    from PIL import Image

    from deepmetric.inference.index import SearchIndex
    from deepmetric.inference.predictor import Predictor

    predictor = Predictor.from_onnx(model)
    pictures = []
    for i in range(8):
        path = work / "pictures" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
        pictures.append(str(path))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((items, predictor.embedding_dim)).astype(np.float32)
    index = SearchIndex(predictor.embedding_dim, "cosine", backend, class_names=[f"c{i}" for i in range(50)],
                        source={"model": predictor.fingerprint})
    index.add(x, rng.integers(0, 50, items), [pictures[i % len(pictures)] for i in range(items)])
    return index.save(work / f"{backend}.index")


def png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Server:
    def __init__(self, model: Path, index: Path, log: Path) -> None:
        env = dict(os.environ, DEEPMETRIC_API_KEY=KEY,
                   PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "deepmetric", "serve", "--model", str(model), "--index", str(index), "--port", "0",
               "--save-every", "50", "--log-level", "warning", "--workers", "2"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.proc.stdout.readline() if sel.select(300) else ""
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}; see {log}")
        self.url = f"http://127.0.0.1:{found.group(1)}"


class Churn:
    """Adders, deleters, searchers and a /health prober against one server; shared tallies."""

    def __init__(self, gallery_ids: list, seed: int) -> None:
        self.lock, self.rng = threading.Lock(), random.Random(seed)
        self.added: dict = {}  # id -> bytes, answered 201
        self.removed, self.tried = set(), set()
        self.candidates = list(gallery_ids)
        self.inflight_deletes = 0
        self.health_during_deletes, self.health_other, self.delete_s, self.search_s = [], [], [], []
        self.errors, self.seed = [], seed * 10 ** 6

    def run(self, url: str, seconds: float, end) -> None:
        import httpx

        stop = threading.Event()

        def client() -> httpx.Client:
            return httpx.Client(base_url=url, headers=AUTH, timeout=60)

        def adder() -> None:
            with client() as c:
                while not stop.is_set():
                    with self.lock:
                        self.seed += 1
                        data = png(self.seed)
                    try:
                        r = c.post("/items", files={"file": ("chaos.png", data, "image/png")}, data={"label": "c1"})
                    except httpx.HTTPError as e:
                        if not stop.is_set():
                            self.errors.append(f"POST {type(e).__name__}: {e}")
                        return
                    if r.status_code == 201:
                        with self.lock:
                            new = r.json()["items"][0]["id"]
                            self.added[new] = data
                            self.candidates.append(new)
                    elif r.status_code != 503:
                        self.errors.append(f"POST {r.status_code} {r.text[:200]}")

        def deleter() -> None:
            with client() as c:
                while not stop.is_set():
                    with self.lock:
                        victim = self.candidates.pop(self.rng.randrange(len(self.candidates)))
                        self.tried.add(victim)
                        self.inflight_deletes += 1
                    start = time.perf_counter()
                    try:
                        r = c.delete(f"/items/{victim}")
                    except httpx.HTTPError:
                        return
                    finally:
                        with self.lock:
                            self.inflight_deletes -= 1
                    if r.status_code == 200:
                        with self.lock:
                            self.removed.add(victim)
                            self.delete_s.append(time.perf_counter() - start)
                    elif r.status_code != 503:
                        self.errors.append(f"DELETE {r.status_code} {r.text[:200]}")

        def searcher() -> None:
            with client() as c:
                while not stop.is_set():
                    start = time.perf_counter()
                    try:
                        r = c.post("/search?top_k=10", files={"file": ("q.png", png(7), "image/png")})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        self.search_s.append(time.perf_counter() - start)

        def prober() -> None:
            with client() as c:
                while not stop.is_set():
                    during = self.inflight_deletes > 0
                    start = time.perf_counter()
                    try:
                        r = c.get("/health")
                    except httpx.HTTPError:
                        return
                    took = time.perf_counter() - start
                    if r.status_code == 200:
                        during = during or self.inflight_deletes > 0
                        (self.health_during_deletes if during else self.health_other).append(took)
                    time.sleep(0.02)

        roles = (adder, adder, adder, deleter, deleter, searcher, searcher, prober)
        with ThreadPoolExecutor(len(roles)) as pool:
            running = [pool.submit(role) for role in roles]
            time.sleep(seconds)
            end()  # SIGKILL or SIGTERM with requests in flight
            stop.set()
            wait(running, timeout=120)

    def check(self, index_path: Path) -> tuple:
        """``(lost adds, resurrected deletes)`` as the next start would find them (file + change log)."""
        from deepmetric.inference.index import SearchIndex

        live = set(SearchIndex.load(index_path).ids.tolist())
        with self.lock:
            lost = set(self.added) - self.tried - live
            back = self.removed & live
            self.candidates = [i for i in self.candidates if i in live]  # a cut-off delete may have happened
        return sorted(lost), sorted(back)


def pct(values: list, q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def rebuild_seconds(index_path: Path) -> float:
    """The peer: a delete before tombstones rebuilt the whole faiss-hnsw graph (SearchIndex.compact now)."""
    from deepmetric.inference.index import SearchIndex

    index = SearchIndex.load(index_path)
    index.remove(ids=index.ids[:1])
    start = time.perf_counter()
    index.compact()
    return time.perf_counter() - start


def run_backend(work: Path, model: Path, backend: str, args: argparse.Namespace) -> dict:
    from deepmetric.inference.index import SearchIndex

    index_path = build_gallery(work, model, backend, args.items)
    peer = rebuild_seconds(index_path) if backend == "faiss-hnsw" else None
    churn = Churn(SearchIndex.load(index_path).ids.tolist(), seed=len(backend))
    segment = args.seconds / (args.kills + 1)
    lost, back, log = [], [], work / f"{backend}.log"
    for k in range(args.kills + 1):
        server = Server(model, index_path, log)
        last = k == args.kills
        churn.run(server.url, segment, (lambda: server.proc.send_signal(signal.SIGTERM)) if last else server.proc.kill)
        server.proc.wait(120)
        a, b = churn.check(index_path)
        lost += a
        back += b
        print(f"  {backend}: segment {k + 1}/{args.kills + 1} ended by {'SIGTERM' if last else 'SIGKILL'}: "
              f"{len(churn.added)} adds and {len(churn.removed)} deletes acknowledged so far; lost {len(a)}, "
              f"back {len(b)}", flush=True)
    return {"backend": backend, "adds": len(churn.added), "deletes": len(churn.removed), "lost": lost, "back": back,
            "health_deletes": churn.health_during_deletes, "health_other": churn.health_other,
            "delete": churn.delete_s, "search": churn.search_s, "errors": churn.errors, "peer": peer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="churn time per backend, all segments")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--items", type=int, default=30_000, help="gallery size")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=["exact", "faiss-hnsw"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work, args.dim)
        results = [run_backend(work, model, b, args) for b in args.backends]
    print(f"\n{args.seconds:.0f} s of churn, {args.kills} SIGKILLs + restarts, {args.items} items of {args.dim}-d, "
          f"{os.cpu_count()} CPUs")
    health = "health p50/p99/max during deletes (ms)"
    print(f"{'backend':<11} {'adds':>5} {'deletes':>7} {'lost':>4} {'back':>4} {health:>40} "
          f"{'delete p50/p99 (ms)':>20} {'search p99 (ms)':>15}")
    for r in results:
        hd, dl = r["health_deletes"], r["delete"]
        health = f"{pct(hd, 50):.1f} / {pct(hd, 99):.1f} / {max(hd) * 1000 if hd else 0:.1f} (n={len(hd)})"
        delete = f"{pct(dl, 50):.1f} / {pct(dl, 99):.1f}"
        print(f"{r['backend']:<11} {r['adds']:>5} {r['deletes']:>7} {len(r['lost']):>4} {len(r['back']):>4} "
              f"{health:>40} {delete:>20} {pct(r['search'], 99):>15.1f}")
        if r["peer"] is not None:
            print(f"  peer, same run: rebuilding the {r['backend']} graph (what a delete did before) took "
                  f"{r['peer'] * 1000:.0f} ms; a delete's p99 is {pct(r['delete'], 99):.1f} ms: "
                  f"{r['peer'] * 1000 / pct(r['delete'], 99):.0f}x less")
        if r["errors"]:
            print(f"  unexpected answers: {r['errors'][:5]}")
    if any(r["lost"] or r["back"] for r in results):
        sys.exit("acknowledged changes were lost")


if __name__ == "__main__":
    main()
