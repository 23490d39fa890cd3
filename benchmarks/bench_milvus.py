"""The Milvus index (Milvus Lite, in this process) against the FAISS backends, on one machine, in one run.

    nice -n 19 python benchmarks/bench_milvus.py                  # 1,000,000 x 128 (long: see --help)
    python benchmarks/bench_milvus.py --n 50000 --kill-after 5     # a quick run

Data: ``--n`` clustered unit vectors (``--clusters`` Gaussian blobs, as ``bench_index.py``) and ``--queries``
fresh queries from the same blobs; the truth is exact inner-product search (FAISS ``IndexFlatIP``).
For each index: add/s (the whole build, from vectors in memory to searchable), queries/s (all queries in
one call), latency p50/p99 of single-query searches (``--single`` of them; ``--milvus-single`` for
Milvus), recall@10 against the truth, and the ratio of each to ``faiss-flat``'s, measured in the same run.

Durability (``--kill-after`` seconds): a child process adds batches of ``--kill-batch`` vectors to a fresh
Milvus Lite file and prints each batch's ids once ``add`` returns (acknowledged); it is killed with
SIGKILL mid-stream, the file is opened again, and the acknowledged ids found there are counted.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_index import clustered, recall_at_k  # noqa: E402

from deepmetric.inference.index import SearchIndex  # noqa: E402

FAISS = [("faiss-flat", {}, {}), ("faiss-ivf", {}, {"nprobe": 32}), ("faiss-hnsw", {}, {"ef_search": 96})]


def truth_of(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return flat.search(q, k)[1]


def latencies(search, q: np.ndarray, n: int) -> tuple:
    times = []
    for row in q[:n]:
        t = time.perf_counter()
        search(row[None])
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000)


def measure_faiss(name, build, knobs, x, q, truth, args):
    t = time.perf_counter()
    index = SearchIndex(x.shape[1], backend=name, **build)
    index.add(x)
    index.search_arrays(q[:1], 10)  # anything deferred to the first search
    add_s = time.perf_counter() - t
    if knobs:
        index.set_search_params(**knobs)
    t = time.perf_counter()
    _, ids = index.search_arrays(q, 10)
    qps = len(q) / (time.perf_counter() - t)
    p50, p99 = latencies(lambda v: index.search_arrays(v, 10), q, args.single)
    return {"index": name, "params": {**build, **knobs}, "add_per_s": len(x) / add_s, "build_s": add_s,
            "queries_per_s": qps, "p50_ms": p50, "p99_ms": p99, "recall@10": recall_at_k(ids, truth)}


def measure_milvus(x, q, truth, args, folder):
    from deepmetric.inference.milvus_backend import MilvusIndex
    from deepmetric.inference.milvus_store import Location

    params = {"index_type": args.milvus_index}
    location = Location.of_uri(str(Path(folder) / "bench.db"))
    index = MilvusIndex.create(location, x.shape[1], **params)
    step, ids = args.milvus_batch, []
    t = time.perf_counter()
    for s in range(0, len(x), step):
        ids.append(index.add(x[s:s + step]))
        if (s // step) % 20 == 19:
            print(f"  milvus: {s + step} added, {(s + step) / (time.perf_counter() - t):.0f}/s", flush=True)
    acked_s = time.perf_counter() - t
    index.client.flush(location.collection)  # seals the segments: Milvus builds their vector index now
    index.search_arrays(q[:1], 10)
    add_s = time.perf_counter() - t
    row_of = np.concatenate(ids)  # Milvus's id of each row
    if args.milvus_ef:
        index.set_search_params(ef_search=args.milvus_ef)
    t = time.perf_counter()
    _, got = index.search_arrays(q, 10)
    qps = len(q) / (time.perf_counter() - t)
    order = np.argsort(row_of)
    rows = np.where(got >= 0, order[np.clip(np.searchsorted(row_of, got, sorter=order), 0, len(order) - 1)], -1)
    p50, p99 = latencies(lambda v: index.search_arrays(v, 10), q, args.milvus_single)
    t = time.perf_counter()
    count = len(index)
    count_s = time.perf_counter() - t
    index.close()
    import milvus_lite
    import pymilvus

    return {"index": f"milvus-lite {milvus_lite.__version__}", "params": {**params, "ef_search": args.milvus_ef},
            "add_per_s": len(x) / add_s, "acked_per_s": len(x) / acked_s, "build_s": add_s, "queries_per_s": qps,
            "p50_ms": p50, "p99_ms": p99, "recall@10": recall_at_k(rows, truth), "count_s": count_s, "count": count,
            "pymilvus": pymilvus.__version__}


CHILD = """
import sys, numpy as np
sys.path.insert(0, {src!r})
from deepmetric.inference.milvus_backend import MilvusIndex
from deepmetric.inference.milvus_store import Location
index = MilvusIndex.create(Location.of_uri({db!r}), {dim}, index_type="AUTOINDEX")
rng = np.random.default_rng(0)
print("ready", flush=True)
while True:
    ids = index.add(rng.standard_normal(({batch}, {dim})).astype(np.float32))
    print("acked", int(ids[0]), int(ids[-1]), len(ids), flush=True)
"""


def kill_test(args, folder):
    """Adds in a child process, SIGKILL after ``--kill-after`` s; the acknowledged ids found on reopening."""
    from deepmetric.inference.milvus_backend import MilvusIndex

    db = str(Path(folder) / "killed.db")
    code = CHILD.format(src=str(ROOT / "src"), db=db, dim=args.dim, batch=args.kill_batch)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked = []
    assert child.stdout.readline().strip() == "ready"

    def read():
        for line in child.stdout:
            parts = line.split()
            if parts and parts[0] == "acked":
                acked.append((int(parts[1]), int(parts[2]), int(parts[3])))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(args.kill_after)
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(timeout=10)
    t = time.perf_counter()
    index = MilvusIndex.open(f"milvus://{db}")
    try:
        total = len(index)  # Milvus Lite 3 replays its log lazily: the first read pays for it
        reopen_s = time.perf_counter() - t
        want = [i for first, last, n in acked for i in ([first, last] if n > 1 else [first])]
        ends = index.rows_in("id", want, ["id"])  # each batch's first and last id
        found = {int(r["id"]) for r in ends}
        kept = [n for first, last, n in acked if first in found and last in found]  # an add is one insert
    finally:
        index.close()
    acked_n = sum(n for _, _, n in acked)
    return {"acknowledged_batches": len(acked), "acknowledged_items": acked_n, "batches_found_after_kill": len(kept),
            "items_in_collection_after_kill": total, "lost_acknowledged_items": acked_n - sum(kept),
            "reopen_s": reopen_s, "check_s": time.perf_counter() - t - reopen_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="single-query searches timed per FAISS index")
    ap.add_argument("--milvus-single", type=int, default=20, help="single-query searches timed for Milvus")
    ap.add_argument("--milvus-index", default="HNSW", help="Milvus index_type (Milvus Lite 2.5: FLAT, IVF_FLAT, AUTOINDEX)")
    ap.add_argument("--milvus-ef", type=int, default=96, help="ef_search for a Milvus HNSW index (0: Milvus's default)")
    ap.add_argument("--milvus-batch", type=int, default=10_000, help="vectors per Milvus add")
    ap.add_argument("--kill-after", type=float, default=20.0, help="seconds of adds before the SIGKILL (0: skip)")
    ap.add_argument("--kill-batch", type=int, default=1000)
    ap.add_argument("--skip", nargs="*", default=[], help="indexes to leave out (faiss-ivf, milvus, ...)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()

    t0 = time.perf_counter()
    x, _, _ = clustered(args.n + args.queries, args.dim, args.clusters, seed=0)
    x, q = x[:args.n], x[args.n:]
    truth = truth_of(x, q, 10)
    print(f"{args.n} x {args.dim} vectors, {args.queries} queries; truth in {time.perf_counter() - t0:.0f} s "
          f"({os.cpu_count()} CPUs)", flush=True)
    results = []
    for name, build, knobs in FAISS:
        if name in args.skip:
            continue
        results.append(measure_faiss(name, build, knobs, x, q, truth, args))
        print(json.dumps(results[-1]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_milvus_") as folder:
        if "milvus" not in args.skip:
            results.append(measure_milvus(x, q, truth, args, folder))
            print(json.dumps(results[-1]), flush=True)
        kill = kill_test(args, folder) if args.kill_after > 0 else None
    peer = next((r for r in results if r["index"] == "faiss-flat"), None)
    print(f"\n{'index':<20} {'add/s':>10} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9}  vs faiss-flat "
          "(add/s, queries/s, p99)")
    for r in results:
        ratio = "" if peer is None else (f"  {r['add_per_s'] / peer['add_per_s']:.3g}x, "
                                         f"{r['queries_per_s'] / peer['queries_per_s']:.3g}x, "
                                         f"{r['p99_ms'] / peer['p99_ms']:.3g}x")
        print(f"{r['index']:<20} {r['add_per_s']:>10.0f} {r['queries_per_s']:>10.1f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['recall@10']:>9.3f}{ratio}")
    if kill:
        print(f"\nkill -9 after {args.kill_after:g} s of adds: {kill['acknowledged_items']} items acknowledged in "
              f"{kill['acknowledged_batches']} batches; after reopening {kill['batches_found_after_kill']} of those "
              f"batches are there ({kill['items_in_collection_after_kill']} items), "
              f"{kill['lost_acknowledged_items']} acknowledged items lost (reopened and counted in {kill['reopen_s']:.1f} s)")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "kill": kill}, indent=1))


if __name__ == "__main__":
    main()
