"""SearchIndex speed and recall: FAISS IVF-Flat, IVF-PQ and HNSW against exact search, measured in one run.

    python benchmarks/bench_index.py                 # 1,000,000 x 128, 1,000 queries (several minutes)
    python benchmarks/bench_index.py --n 100000      # a quick run

Data: ``--n`` clustered vectors (``--clusters`` Gaussian blobs, unit-normalised, cosine metric) and
``--queries`` fresh queries from the same blobs. Ground truth is the exact (torch, chunked) backend.
For each approximate backend the search knob (``nprobe`` / ``ef_search``) is raised until recall@10
against exact reaches ``--target-recall``; the table shows that setting, its queries per second
(one batch of all queries, best of ``--repeats``) and the ratio to exact search's, build time and
index size. The target (DESIGN §7): recall@10 >= 0.95 at >= 20x exact's queries per second.

The exact backend (ranking keys + ``evaluation.neighbors.stable_topk``) is timed against its peer, the
previous exact backend's chunked matmul + running ``torch.topk`` (reproduced below), on all queries at
once and one query at a time (``--single``). ``--live`` times a live-gallery update per backend: add
1% new vectors, remove 1% by id, save and load, against rebuilding the index from scratch.
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

import torch  # noqa: E402

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


@torch.no_grad()
def matmul_topk(g: torch.Tensor, q: np.ndarray, k: int, qc: int = 1024, gc: int = 65536) -> np.ndarray:
    """The previous exact backend: chunked ``Q x G`` inner products with a running top-k (cosine)."""
    qt, out = torch.from_numpy(q), []
    for qs in range(0, len(qt), qc):
        qb = qt[qs:qs + qc]
        best_s, best_i = torch.empty(len(qb), 0), torch.empty(len(qb), 0, dtype=torch.int64)
        for gs in range(0, len(g), gc):
            s, i = (qb @ g[gs:gs + gc].T).topk(min(k, len(g) - gs), dim=1)
            best_s, pos = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + gs], 1).gather(1, pos)
        out.append(best_i)
    return torch.cat(out).numpy()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def compare_exact(args, exact: SearchIndex, x: np.ndarray, q: np.ndarray) -> None:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = torch.from_numpy(x)  # already unit vectors
    print(f"\n| exact search, {args.n} x {args.dim} | stable_topk (now) | matmul + topk (before) | ratio |")
    print("|---|---|---|---|")
    for label, batch in ((f"{len(q)} queries at once", q), (f"{args.single} single queries", q[:args.single])):
        single = batch is not q
        now = best_time(lambda: [exact.search_arrays(b, args.k) for b in (batch[:, None] if single else [batch])],
                        args.repeats)
        before = best_time(lambda: [matmul_topk(g, b, args.k) for b in (qn[:len(batch), None] if single else [qn])],
                           args.repeats)
        print(f"| {label} | {len(batch) / now:,.1f} q/s | {len(batch) / before:,.1f} q/s | {before / now:.2f}x |")
    same = (exact.search_arrays(q, args.k)[1] == matmul_topk(g, qn, args.k)).mean()
    print(f"same neighbours (ties aside): {same:.4f}")


def live_update(args, x: np.ndarray, tmp: Path) -> None:
    """Per backend: add 1%, remove 1% by id, save, load, against a rebuild from scratch."""
    m = max(1, len(x) // 100)
    base, new = x[:-m], x[-m:]
    print(f"\n| live update, {len(base)} + {m} vectors | add {m} s | remove {m} s | save s | load s | file MiB | rebuild s |")
    print("|---|---|---|---|---|---|---|")
    for backend in ["exact", "faiss-flat", *[b for b in args.backends.split(",") if b]]:
        params = BUILD.get(backend, {})
        index = SearchIndex(args.dim, "cosine", backend, **params)
        index.add(base)
        t_add = best_time(lambda: index.add(new), 1)
        t_remove = best_time(lambda: index.remove(ids=np.arange(0, len(base), 100)[:m]), 1)
        path = tmp / f"{backend}.index"
        t_save = best_time(lambda: index.save(path), 1)
        t_load = best_time(lambda: SearchIndex.load(path), 1)

        def rebuild():
            fresh = SearchIndex(args.dim, "cosine", backend, **params)
            fresh.add(x)
        t_rebuild = best_time(rebuild, 1)
        print(f"| {backend} | {t_add:.3f} | {t_remove:.3f} | {t_save:.2f} | {t_load:.2f} | "
              f"{path.stat().st_size / 2**20:,.0f} | {t_rebuild:.2f} |")
        path.unlink()


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
    p.add_argument("--single", type=int, default=50, help="queries searched one at a time in the exact comparison")
    p.add_argument("--live", action="store_true", help="time add / remove / save / load per backend")
    p.add_argument("--only-exact", action="store_true", help="only the exact comparison (and --live)")
    args = p.parse_args()

    import faiss

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
    compare_exact(args, exact, x, q)
    if args.live:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            live_update(args, x, Path(tmp))
    if args.only_exact:
        return 0

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
