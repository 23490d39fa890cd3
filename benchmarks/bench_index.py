"""SearchIndex speed and recall: FAISS IVF-Flat, IVF-PQ and HNSW against exact search, measured in one run.

    python benchmarks/bench_index.py                 # 1,000,000 x 128, 1,000 queries (several minutes)
    python benchmarks/bench_index.py --n 100000      # a quick run

Data: ``--n`` clustered vectors (``--clusters`` Gaussian blobs, unit-normalised, cosine metric) and
``--queries`` fresh queries from the same blobs. Ground truth is the exact (torch, chunked) backend.
For each approximate backend the search knob (``nprobe`` / ``ef_search``) is raised until recall@10
against exact reaches ``--target-recall``; the table shows that setting, its queries per second
(one batch of all queries, best of ``--repeats``) and the ratio to exact search's, build time and
index size. The target (DESIGN §7): recall@10 >= 0.95 at >= 20x exact's queries per second.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepmetric.inference.index import SearchIndex  # noqa: E402

# search settings tried in order until the recall target is met
SWEEPS = {"faiss-ivf": [{"nprobe": v} for v in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)],
          "faiss-ivfpq": [{"nprobe": 16, "refine": r} for r in (8, 16, 32, 64, 128, 256)],
          "faiss-hnsw": [{"ef_search": v} for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)]}
BUILD = {"faiss-ivfpq": {"refine": 8}}  # IVF-PQ alone plateaus far below the target (PQ ranking error)


def clustered(n: int, d: int, clusters: int, seed: int, spread: float = 0.35):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 200_000):  # in blocks: the float64 temporaries stay small
        e = min(n, s + 200_000)
        out[s:e] = centres[rng.integers(0, clusters, e - s)] + spread * rng.standard_normal((e - s, d), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out, centres, rng


def timed_search(index: SearchIndex, q: np.ndarray, k: int, repeats: int):
    best, ids = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        _, ids = index.search_arrays(q, k)
        best = min(best, time.perf_counter() - t)
    return len(q) / best, ids


def recall_at_k(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k].tolist()) & set(b.tolist())) / k for a, b in zip(ids, truth)]))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_flat(args, x, q, truth, exact_qps, rows) -> None:
    flat = SearchIndex(args.dim, "cosine", "faiss-flat")
    t = time.perf_counter()
    flat.add(x)
    flat_build = time.perf_counter() - t
    flat_qps, flat_ids = timed_search(flat, q, args.k, args.repeats)
    rows.append(("faiss-flat", "-", recall_at_k(flat_ids, truth), flat_qps, flat_qps / exact_qps, flat_build,
                 x.nbytes / 2**20))
    print(f"faiss-flat: {flat_qps:.1f} q/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--backends", default="faiss-ivf,faiss-hnsw,faiss-ivfpq")
    p.add_argument("--param", action="append", default=[], metavar="BACKEND:KEY=VALUE",
                   help="build parameter, e.g. faiss-hnsw:M=16 (IVF-PQ is built with refine=8 by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flat", action="store_true", help="skip the faiss-flat (exact) peer")
    args = p.parse_args()

    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    build_params: dict = {}
    for item in args.param:
        backend, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        build_params.setdefault(backend, {})[key] = int(value)

    t = time.perf_counter()
    x, centres, rng = clustered(args.n, args.dim, args.clusters, args.seed)
    q = centres[rng.integers(0, args.clusters, args.queries)] + 0.35 * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32)
    print(f"data: {args.n} x {args.dim} float32 in {args.clusters} clusters, {args.queries} queries, "
          f"k={args.k}, {args.threads} threads (cpu count {os.cpu_count()}); made in {time.perf_counter() - t:.1f}s")

    exact = SearchIndex(args.dim, "cosine", "exact")
    t = time.perf_counter()
    exact.add(x)
    exact_build = time.perf_counter() - t
    exact_qps, truth = timed_search(exact, q, args.k, args.repeats)
    rows = [("exact (torch)", "-", 1.0, exact_qps, 1.0, exact_build, x.nbytes / 2**20)]
    print(f"exact: {exact_qps:.1f} q/s")

    if not args.no_flat:
        run_flat(args, x, q, truth, exact_qps, rows)

    chosen = {}
    for backend in [b for b in args.backends.split(",") if b]:
        index = SearchIndex(args.dim, "cosine", backend, **{**BUILD.get(backend, {}), **build_params.get(backend, {})})
        t = time.perf_counter()
        index.add(x)
        build = time.perf_counter() - t
        size = len(faiss.serialize_index(index.backend.index)) / 2**20
        print(f"{backend}: built in {build:.1f}s ({index.info()['params']}), {size:.0f} MiB")
        pick = None
        for setting in SWEEPS[backend]:
            index.set_search_params(**setting)
            qps, ids = timed_search(index, q, args.k, args.repeats)
            rec = recall_at_k(ids, truth)
            desc = ", ".join(f"{k}={v}" for k, v in setting.items())
            print(f"  {desc:<22} recall@{args.k}={rec:.4f}  {qps:9.1f} q/s  ({qps / exact_qps:6.1f}x exact)")
            pick = (desc, rec, qps)
            if rec >= args.target_recall:
                break
        desc, rec, qps = pick
        chosen[backend] = desc
        build_desc = ", ".join(f"{k}={v}" for k, v in index.info()["params"].items()
                               if k not in ("ef_search", "nprobe", "refine"))
        rows.append((backend, f"{desc} ({build_desc})", rec, qps, qps / exact_qps, build, size))
        del index

    print(f"\npeak RSS {rss_mb():.0f} MiB")
    print(f"\n| index | search setting (build) | recall@{args.k} | queries/s | vs exact | build s | size MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, setting, rec, qps, ratio, build, size in rows:
        print(f"| {name} | {setting} | {rec:.4f} | {qps:,.0f} | {ratio:.1f}x | {build:.1f} | {size:,.0f} |")
    ok = {name: rec >= args.target_recall and ratio >= 20 for name, _, rec, _, ratio, _, _ in rows if name.startswith(tuple(SWEEPS))}
    print("\ntarget recall@%d >= %.2f at >= 20x exact q/s: %s" % (
        args.k, args.target_recall, ", ".join(f"{b} {'met' if v else 'NOT met'}" for b, v in ok.items())))
    print("chosen settings: " + "; ".join(f"{b}: {d}" for b, d in chosen.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
