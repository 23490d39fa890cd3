"""The streaming ``deepmetric index build`` at scale: peak memory, time, recall@10 and queries/s (issue 25).

    nice -n 19 python benchmarks/bench_stream_index.py                     # 10,000,000 x 128 (tens of minutes)
    python benchmarks/bench_stream_index.py --n 1000000 --on-disk no yes   # 1M, lists in memory and on disk

Data: ``--n`` clustered vectors (``--clusters`` Gaussian blobs, unit-normalised; by default one blob per
10 vectors, like a catalogue's photos of one product: SOP has 5.3 per product), generated a chunk at a
time into a Parquet folder in the layout ``torchrun -m deepmetric embed`` writes (never all in memory),
in ``--dir`` (deleted afterwards unless ``--keep``); ``--queries`` fresh queries from the same blobs.
With many vectors per blob (``--clusters 1000`` at 1M, as ``bench_index.py``) the members of a blob are
nearly equidistant from a query and PQ codes cannot rank them: recall@10 falls to ~0.3 while the true
top 10 are still among the first 100 hits (the ``top-10 in 100`` column; ``--param refine=R`` re-ranks
them exactly, at 4 D bytes a vector of memory).

Build: ``deepmetric index build --backend faiss-ivfpq`` in a child process, once per ``--on-disk``
value, timed, with the child's peak resident memory (``ru_maxrss`` from ``wait4``) against the target
(DESIGN §7: under 3 GB at 10M x 128).

Ground truth: exact cosine top-10 of every query, computed by streaming over the chunks (FAISS flat
search of each chunk, results merged). The peer is that exact streaming search: its queries/s is
measured while computing the ground truth, and the table gives the index's queries/s as a ratio to it.
For each ``--nprobe`` the table gives recall@10 against exact, the share of the exact top 10 among the
first 100 hits, and queries/s (all queries in one batch, best of ``--repeats``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepmetric.inference.embeddings_io import open_embeddings  # noqa: E402
from deepmetric.inference.index import SearchIndex  # noqa: E402
from deepmetric.inference.shards import write_folder  # noqa: E402


def blob_sampler(d: int, clusters: int, seed: int, spread: float = 0.35):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)

    def draw(n: int, rng: np.random.Generator):
        labels = rng.integers(0, clusters, n)
        x = centres[labels] + spread * rng.standard_normal((n, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, labels

    return draw


def generate(folder: Path, n: int, d: int, clusters: int, chunk: int, seed: int) -> float:
    draw, rng = blob_sampler(d, clusters, seed), np.random.default_rng(seed + 1)

    def blocks():
        for s in range(0, n, chunk):
            x, labels = draw(min(chunk, n - s), rng)
            yield x, labels % 1000, [f"/catalogue/{i // 10000:05d}/{i:010d}.jpg" for i in range(s, s + len(x))]

    start = time.perf_counter()
    write_folder(folder, blocks(), model="synthetic-clustered", l2_normalized=True,
                 class_names=[f"class_{c:03d}" for c in range(1000)])
    return time.perf_counter() - start


def build_measured(folder: Path, output: Path, on_disk: str, train_size: int, threads: int, params: list) -> dict:
    """``deepmetric index build`` in a child process: wall time, and the child's peak RSS from ``wait4``
    (spawned with ``os.posix_spawn`` and waited for here: ``subprocess`` reaps its children itself)."""
    cmd = [sys.executable, "-m", "deepmetric", "index", "build", "--embeddings", str(folder), "--output",
           str(output), "--backend", "faiss-ivfpq", "--train-size", str(train_size), "--on-disk", on_disk,
           *(a for kv in params for a in ("--param", kv))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = output.with_suffix(".log")
    with open(log, "w") as fh:
        start = time.perf_counter()
        pid = os.posix_spawn(sys.executable, cmd, env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, fh.fileno(), 1), (os.POSIX_SPAWN_DUP2, fh.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"index build failed: {text[-2000:]}")
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "lines": [line for line in text.splitlines() if "WARNING clustering" not in line]}


def exact_top10(folder: Path, queries: np.ndarray, k: int = 10):
    """Exact cosine top-``k`` row ids of every query, streaming over the chunks; and the seconds it took."""
    import faiss

    src = open_embeddings(folder)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    start, row0 = time.perf_counter(), 0
    for block in src.blocks(vectors_only=True):
        s, i = faiss.knn(queries, block.vectors, min(k, len(block.vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        s_all, i_all = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + row0], 1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, order, 1), np.take_along_axis(i_all, order, 1)
        row0 += len(block.vectors)
    return best_i, time.perf_counter() - start


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """The share of each query's exact top ``k`` (``truth (Q, k)``) among its hits ``ids (Q, h)``, averaged."""
    k = truth.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, truth)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=None, help="Gaussian blobs (default: one per 10 vectors)")
    p.add_argument("--chunk", type=int, default=100_000, help="rows per Parquet chunk file")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--on-disk", nargs="+", default=["no", "yes"], choices=["no", "yes", "auto"])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="passed to index build")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="OMP threads of the build (0: FAISS's default)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/bench_stream_index"))
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--reuse", action="store_true",
                   help="reuse data (and exact top 10) that an earlier --keep run left in --dir for the same sizes")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    args.clusters = args.clusters or max(1, args.n // 10)

    folder = args.dir / "embeddings"
    sizes = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "chunk": args.chunk, "queries": args.queries}
    stamp = args.dir / "sizes.json"
    reuse = args.reuse and stamp.is_file() and json.loads(stamp.read_text()).get("sizes") == sizes
    if args.dir.exists() and not reuse:
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True, exist_ok=True)
    figures: dict = {**sizes, "cpus": os.cpu_count(), "builds": {}}
    try:
        if reuse:
            figures.update(json.loads(stamp.read_text())["figures"])
        else:
            figures["generate_s"] = generate(folder, args.n, args.dim, args.clusters, args.chunk, seed=0)
        size = sum(f.stat().st_size for f in folder.iterdir())
        figures["parquet_gb"] = size / 1e9
        print(f"data: {args.n:,} x {args.dim} float32 ({args.clusters:,} blobs) in {args.n // args.chunk + (args.n % args.chunk > 0)} Parquet "
              f"chunks, {size / 1e9:.2f} GB, written in {figures['generate_s']:.0f} s", flush=True)
        draw = blob_sampler(args.dim, args.clusters, seed=0)
        queries, _ = draw(args.queries, np.random.default_rng(12345))
        cached = args.dir / "truth.npy"
        if reuse and cached.is_file():
            truth, exact_s = np.load(cached), args.queries / figures["exact_streaming_qps"]
        else:
            truth, exact_s = exact_top10(folder, queries)
            figures["exact_streaming_qps"] = args.queries / exact_s
            np.save(cached, truth)
            stamp.write_text(json.dumps({"sizes": sizes, "figures": {k: figures[k] for k in (
                "generate_s", "exact_streaming_qps")}}))
        print(f"peer, exact search streamed over the chunks: {exact_s:.1f} s for {args.queries} queries "
              f"({figures['exact_streaming_qps']:.1f} queries/s)", flush=True)
        for on_disk in args.on_disk:
            output = args.dir / f"gallery-{on_disk}.index"
            b = build_measured(folder, output, on_disk, args.train_size, args.threads, args.param)
            t = time.perf_counter()
            index = SearchIndex.load(output)
            b["load_s"] = time.perf_counter() - t
            files = [output, *(args.dir.glob(output.name + ".*.ivfdata"))]
            b["index_gb"] = sum(f.stat().st_size for f in files) / 1e9
            b["params"] = index.info()["params"]
            rows = []
            for nprobe in args.nprobe:
                index.set_search_params(nprobe=nprobe)
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    _, ids = index.search_arrays(queries, 10)
                    best = min(best, time.perf_counter() - t)
                top100 = recall(index.search_arrays(queries, 100)[1], truth)
                rows.append({"nprobe": nprobe, "recall@10": recall(ids, truth), "top10_in_100": top100,
                             "qps": args.queries / best, "vs_exact": args.queries / best / figures["exact_streaming_qps"]})
            b["search"] = rows
            figures["builds"][on_disk] = b
            print(f"\nbuild --on-disk {on_disk}: {b['seconds']:.0f} s, peak RSS {b['peak_rss_gb']:.2f} GB "
                  f"(target < 3 GB), index {b['index_gb']:.2f} GB on disk (loads in {b['load_s']:.1f} s), "
                  f"params {b['params']}")
            print(f"  {'nprobe':>6}  {'recall@10':>9}  {'top-10 in 100':>13}  {'queries/s':>10}  {'x exact':>8}")
            for r in rows:
                print(f"  {r['nprobe']:>6}  {r['recall@10']:>9.3f}  {r['top10_in_100']:>13.3f}  {r['qps']:>10.0f}  "
                      f"{r['vs_exact']:>8.0f}")
            del index
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
