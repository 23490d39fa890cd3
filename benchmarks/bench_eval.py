"""Evaluation speed and memory against the peers, each side in its own subprocess (run by hand).

    python benchmarks/bench_eval.py            # SOP-sized retrieval (60,502 × 128) + Market-sized re-ranking
    python benchmarks/bench_eval.py --quick    # smaller sizes, about a minute
    python benchmarks/bench_eval.py --only sop # or: --only rerank
    python benchmarks/bench_eval.py --threads 1   # every side single-threaded (torch, BLAS, faiss OpenMP)
    python benchmarks/bench_eval.py --repeat 3    # sides interleaved 3 times, best time and largest RSS kept

Rows:
- retrieval, leave-one-out on random clustered SOP-like data (11,316 classes, 2-12 images each, L2-normalised):
  deepmetric ``retrieval_metrics`` (Recall@1/10/100/1000, MAP@R, R-precision, full mAP; cosine) vs PML
  ``AccuracyCalculator(k="max_bin_count")`` (P@1, MAP@R, R-precision; faiss IndexFlatL2), and the bare
  chunked similarity product (query chunks @ gallery.T, same chunk size) as the floor.
- k-reciprocal re-ranking at Market-1501 size (3,368 queries × 15,913 gallery, squared-L2 inputs as torchreid's
  pipeline): deepmetric ``k_reciprocal_rerank`` vs torchreid ``re_ranking``, outputs compared in the same run.

Time is wall-clock of the metric call only (data generation excluded); peak RSS is the worker's
``ru_maxrss``, which includes its inputs (the RSS after building them is shown too). On a shared machine,
``--repeat`` interleaves the sides and keeps each one's best time, so a burst of load hits neither alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {
    "full": {"sop_n": 60502, "sop_classes": 11316, "sop_dim": 128, "rr_q": 3368, "rr_g": 15913, "rr_dim": 512},
    "quick": {"sop_n": 12000, "sop_classes": 2244, "sop_dim": 128, "rr_q": 800, "rr_g": 3000, "rr_dim": 256},
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sop_like(n: int, classes: int, dim: int, sigma: float = 1.4, seed: int = 0):
    """Class sizes 2..12 (mean n/classes, as SOP's test split), Gaussian clusters, L2-normalised."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(2 + rng.poisson(n / classes - 2, classes), 2, 12)
    while sizes.sum() != n:
        i = rng.integers(classes)
        if sizes.sum() < n and sizes[i] < 12:
            sizes[i] += 1
        elif sizes.sum() > n and sizes[i] > 2:
            sizes[i] -= 1
    labels = np.repeat(np.arange(classes), sizes)
    rng.shuffle(labels)
    x = rng.standard_normal((classes, dim)).astype(np.float32)[labels]
    x += sigma * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def market_like(n_q: int, n_g: int, dim: int, seed: int = 0):
    """Squared-L2 distance matrices (q_g, q_q, g_g) of clustered, L2-normalised features (751 identities)."""
    import torch

    from deepmetric.evaluation import pairwise_distances

    rng = np.random.default_rng(seed)
    pid = rng.integers(0, 751, n_q + n_g)
    x = rng.standard_normal((751, dim)).astype(np.float32)[pid]
    x += 1.2 * rng.standard_normal((n_q + n_g, dim)).astype(np.float32)
    x = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    q, g = x[:n_q], x[n_q:]
    return [pairwise_distances(a, b, "squared_euclidean").numpy() for a, b in ((q, g), (q, q), (g, g))]


def worker(name: str, size: dict, out_path: str) -> dict:
    import torch

    res: dict = {"name": name}
    if name.startswith("sop"):
        x, y = sop_like(size["sop_n"], size["sop_classes"], size["sop_dim"])
        res["rss_inputs_mb"] = rss_mb()
        if name == "sop_ours":
            from deepmetric.evaluation import retrieval_metrics

            t = time.perf_counter()
            m = retrieval_metrics(x, y, ks=(1, 10, 100, 1000), distance="cosine")
            res["seconds"] = time.perf_counter() - t
            res["metrics"] = {k: m[k] for k in ("recall@1", "recall@10", "recall@100", "recall@1000", "map@r",
                                                "r_precision", "map")}
        elif name == "sop_pml":
            from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

            calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                                      k="max_bin_count", device=torch.device("cpu"))
            t = time.perf_counter()
            m = calc.get_accuracy(x, y)
            res["seconds"] = time.perf_counter() - t
            res["metrics"] = {"recall@1": m["precision_at_1"], "map@r": m["mean_average_precision_at_r"],
                              "r_precision": m["r_precision"]}
        elif name == "sop_matmul":
            from deepmetric.evaluation.neighbors import default_chunk, padded_width

            xt = torch.from_numpy(x)
            gt = xt.T.contiguous()
            step = default_chunk(padded_width(len(x)), None)
            buf = torch.empty(step, len(x))
            t = time.perf_counter()
            for r in range(0, len(x), step):
                torch.mm(xt[r : r + step], gt, out=buf[: min(step, len(x) - r)])
            res["seconds"] = time.perf_counter() - t
    else:
        qg, qq, gg = market_like(size["rr_q"], size["rr_g"], size["rr_dim"])
        res["rss_inputs_mb"] = rss_mb()
        if name == "rerank_ours":
            from deepmetric.evaluation import k_reciprocal_rerank as fn
        else:
            from torchreid.reid.utils.rerank import re_ranking as fn
        t = time.perf_counter()
        out = fn(qg, qq, gg, k1=20, k2=6, lambda_value=0.3)
        res["seconds"] = time.perf_counter() - t
        np.save(out_path, out)
    res["peak_rss_mb"] = rss_mb()
    return res


def run(name: str, size_key: str, out_path: str, threads: int = 0) -> dict:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--size", size_key, "--out", out_path,
           "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(rounds: int, sides: list) -> list:
    """Run the sides in turn ``rounds`` times; keep each side's fastest run and its largest peak RSS."""
    best: list = [None] * len(sides)
    for _ in range(max(1, rounds)):
        for i, side in enumerate(sides):
            r = side()
            if best[i] is None or r["seconds"] < best[i]["seconds"]:
                r["peak_rss_mb"] = max(r["peak_rss_mb"], best[i]["peak_rss_mb"] if best[i] else 0.0)
                best[i] = r
            else:
                best[i]["peak_rss_mb"] = max(best[i]["peak_rss_mb"], r["peak_rss_mb"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--only", choices=("sop", "rerank"), default=None)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; best time per side is kept")
    ap.add_argument("--threads", type=int, default=0, help="threads for every side (0: library defaults)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, SIZES[args.size], args.out)))
        return
    size_key = "quick" if args.quick else "full"
    size = SIZES[size_key]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sop"):
            ours, pml, mm = best_of(args.repeat, [lambda n=n: run(n, size_key, "", args.threads)
                                                  for n in ("sop_ours", "sop_pml", "sop_matmul")])
            diffs = {k: abs(ours["metrics"][k] - v) for k, v in pml["metrics"].items()}
            n = size["sop_n"]
            rows.append((f"retrieval LOO {n}×{size['sop_dim']}: deepmetric (R@1/10/100/1000, MAP@R, R-prec, mAP)",
                         ours, f"{pml['seconds'] / ours['seconds']:.2f}× faster than PML; "
                               f"{ours['seconds'] / mm['seconds']:.2f}× the bare matmul"))
            rows.append(("retrieval: PML AccuracyCalculator(k=max_bin_count) (P@1, MAP@R, R-prec)", pml, ""))
            rows.append(("retrieval: bare chunked matmul (floor)", mm, ""))
            print("metrics (deepmetric):", json.dumps({k: round(v, 5) for k, v in ours["metrics"].items()}))
            print("max |deepmetric − PML| on shared metrics:", json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
        if args.only in (None, "rerank"):
            a, b = os.path.join(tmp, "ours.npy"), os.path.join(tmp, "ref.npy")
            ours, ref = best_of(args.repeat, [lambda: run("rerank_ours", size_key, a, args.threads),
                                              lambda: run("rerank_torchreid", size_key, b, args.threads)])
            diff = float(np.abs(np.load(a) - np.load(b)).max())
            rows.append((f"re-ranking {size['rr_q']}×{size['rr_g']}: deepmetric k_reciprocal_rerank", ours,
                         f"{ref['seconds'] / ours['seconds']:.1f}× faster; max |Δ| = {diff:.2e}"))
            rows.append(("re-ranking: torchreid re_ranking", ref, ""))
    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"\nthreads per side: {threads}; torch {torch.__version__}; {os.cpu_count()} CPUs")
    print("\n| run | time (s) | peak RSS (MB) | RSS of inputs (MB) | vs peer |\n|---|---|---|---|---|")
    for label, r, note in rows:
        print(f"| {label} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_inputs_mb']:.0f} | {note} |")


if __name__ == "__main__":
    main()
