"""Forward+backward time and peak memory of deepmetric losses against pytorch-metric-learning (PML).

Run by hand, not a test:

    PYTHONPATH=src python benchmarks/bench_losses.py --batch 128 512 --dim 512 --repeats 7 --device cpu

Each case times ``loss(x, y).backward()`` on the same random inputs (P x K batches, K=4 images per
class; classification losses with --classes classes) for ours and for PML, in the same process,
in alternating blocks, and reports the median of ``--repeats`` runs after warm-up (fewer runs for
an implementation slower than ``--budget`` seconds). ``--clock cpu`` (the default on CPU) measures
the process CPU time of each run, which other jobs on a shared machine barely disturb; with
``--threads 1`` it is the single-core compute time. ``--clock wall`` (the default on CUDA, after a
synchronize) measures elapsed time.

Peak memory: the peak of tensor memory allocated during one forward+backward, above what was
allocated before it (inputs and parameters excluded). On CUDA, ``torch.cuda.max_memory_allocated``.
On CPU, PyTorch keeps no allocator statistics (and tracemalloc does not see tensors), so one
forward+backward runs under ``torch.profiler`` with ``profile_memory=True``, whose allocation
events carry the running total of allocated bytes; the peak of that total is reported. This counts
tensors only (not Python objects or allocator slack), identically for both implementations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepmetric.losses import LOSSES, build_loss  # noqa: E402

Factory = Callable[[int, int, int], Callable]  # (batch, dim, classes) -> loss_fn(x, y)


def _pml():
    import pytorch_metric_learning.losses as pl
    import pytorch_metric_learning.miners as pm

    return pl, pm


def pml_pair(make: Callable) -> Factory:
    def factory(n, d, c):
        return make(*_pml())

    return factory


def pml_mined(make_loss: Callable, make_miner: Callable) -> Factory:
    def factory(n, d, c):
        pl, pm = _pml()
        loss, miner = make_loss(pl), make_miner(pm)
        return lambda x, y: loss(x, y, miner(x, y))

    return factory


def pml_cls(make: Callable) -> Factory:
    def factory(n, d, c):
        pl, _ = _pml()
        return make(pl, c, d)

    return factory


def ours(name: str, **params) -> Factory:
    def factory(n, d, c):
        if LOSSES.get(name).kind == "classification":
            return build_loss(name, num_classes=c, embedding_dim=d, **params)
        return build_loss(name, **params)

    return factory


# case name -> (ours, PML or None, kind)
CASES: dict[str, tuple[Factory, Optional[Factory], str]] = {
    "triplet (all)": (ours("triplet", margin=0.05), pml_pair(lambda pl, pm: pl.TripletMarginLoss(0.05)), "pair"),
    "triplet (hard)": (
        ours("triplet", margin=0.05, mining="hard"),
        pml_mined(lambda pl: pl.TripletMarginLoss(0.05), lambda pm: pm.BatchHardMiner()), "pair"),
    "triplet (semihard)": (
        ours("triplet", margin=0.05, mining="semihard"),
        pml_mined(lambda pl: pl.TripletMarginLoss(0.05),
                  lambda pm: pm.TripletMarginMiner(0.05, type_of_triplets="semihard")), "pair"),
    "contrastive": (ours("contrastive"), pml_pair(lambda pl, pm: pl.ContrastiveLoss()), "pair"),
    "multi_similarity": (ours("multi_similarity"), pml_pair(lambda pl, pm: pl.MultiSimilarityLoss()), "pair"),
    "multi_similarity + miner": (
        ours("multi_similarity", miner_epsilon=0.1),
        pml_mined(lambda pl: pl.MultiSimilarityLoss(), lambda pm: pm.MultiSimilarityMiner(0.1)), "pair"),
    "circle": (ours("circle"), pml_pair(lambda pl, pm: pl.CircleLoss()), "pair"),
    "supcon": (ours("supcon"), pml_pair(lambda pl, pm: pl.SupConLoss()), "pair"),
    "ntxent": (ours("ntxent"), pml_pair(lambda pl, pm: pl.NTXentLoss()), "pair"),
    "npairs": (ours("npairs"), pml_pair(lambda pl, pm: pl.NPairsLoss()), "pair"),
    "contrastive_xbm": (ours("contrastive_xbm"), None, "pair"),
    "quadruplet": (ours("quadruplet"), None, "pair"),
    "eml": (ours("eml"), None, "pair"),
    "centroid_triplet": (ours("centroid_triplet"), None, "pair"),
    "arcface": (ours("arcface", margin=0.5), pml_cls(lambda pl, c, d: pl.ArcFaceLoss(c, d, margin=math.degrees(0.5))), "cls"),
    "subcenter_arcface": (
        ours("subcenter_arcface", margin=0.5),
        pml_cls(lambda pl, c, d: pl.SubCenterArcFaceLoss(num_classes=c, embedding_size=d,
                                                         margin=math.degrees(0.5))), "cls"),
    "cosface": (ours("cosface"), pml_cls(lambda pl, c, d: pl.CosFaceLoss(c, d)), "cls"),
    "normalized_softmax": (ours("normalized_softmax"), pml_cls(lambda pl, c, d: pl.NormalizedSoftmaxLoss(c, d)), "cls"),
    "proxy_anchor": (ours("proxy_anchor"), pml_cls(lambda pl, c, d: pl.ProxyAnchorLoss(c, d)), "cls"),
    "circle_class": (ours("circle_class"), None, "cls"),
    "softmax": (ours("softmax"), None, "cls"),
    "center": (ours("center"), None, "cls"),
}


def make_inputs(kind: str, n: int, d: int, c: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
    if kind == "pair":
        y = torch.arange(n) // 4
        y = y[torch.randperm(n, generator=g)]
    else:
        y = torch.randint(0, c, (n,), generator=g)
    return x, y.to(device)


def build(case: str, impl: str, n: int, d: int, c: int, device: str):
    ours_f, pml_f, kind = CASES[case]
    fn = (ours_f if impl == "ours" else pml_f)(n, d, c)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device)
    x, y = make_inputs(kind, n, d, c, device)
    return fn, x, y


def step(fn, x, y, device: str) -> None:
    x.grad = None
    if isinstance(fn, torch.nn.Module):
        fn.zero_grad(set_to_none=True)
    fn(x, y).backward()
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(case: str, n: int, d: int, c: int, device: str, repeats: int, budget_s: float,
              measure_memory: bool, clock: Callable[[], float] = time.perf_counter) -> dict:
    impls = ["ours"] + (["pml"] if CASES[case][1] is not None else [])
    built = {impl: build(case, impl, n, d, c, device) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    reps, fast = {}, {}
    for impl in impls:  # warm-up; a slow implementation gets fewer repeats (time budget per case)
        t0 = clock()
        step(*built[impl], device)
        first = clock() - t0
        fast[impl] = first < 1.0
        if fast[impl]:
            step(*built[impl], device)
        reps[impl] = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    # two blocks, A..A B..B A..A B..B: load drifts hit both alike, and one library's big
    # allocations (PML's NT-Xent) do not land between the other's runs
    halves = {impl: [(reps[impl] + 1) // 2, reps[impl] // 2] for impl in impls}
    for block in range(2):
        for impl in impls:
            if halves[impl][block] and fast[impl] and block:
                step(*built[impl], device)  # re-warm after the other implementation
            for _ in range(halves[impl][block]):
                t0 = clock()
                step(*built[impl], device)
                times[impl].append(clock() - t0)
    out = {impl: statistics.median(v) * 1e3 for impl, v in times.items()}
    if measure_memory:
        for impl in impls:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step(*built[impl], device)
                out[impl + "_mem"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                out[impl + "_mem"] = cpu_peak_mib(*built[impl])
    return out


def cpu_peak_mib(fn, x, y) -> float:
    """Peak of tensor memory allocated during one forward+backward on CPU, in MiB, from the
    profiler's allocation events (``profile_memory=True``: each event carries the running total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, x, y, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(e["Total Allocated"] for e in events) - base) / 2**20


def fmt(v: Optional[float], digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=11318, help="classes of the classification losses")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--budget", type=float, default=8.0,
                    help="seconds of timed runs per implementation and case (fewer repeats if slow)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="process CPU time or elapsed time (default: cpu on CPU, wall on CUDA)")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = args.only or list(CASES)
    clock_name = args.clock or ("cpu" if args.device == "cpu" else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    print(f"device={args.device} threads={args.threads} clock={clock_name} dim={args.dim} "
          f"classes={args.classes} repeats={args.repeats} torch={torch.__version__}\n")
    print("| loss | batch | ours ms | PML ms | time ratio | ours MiB | PML MiB | mem ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        for n in args.batch:
            r = time_pair(case, n, args.dim, args.classes, args.device, args.repeats, args.budget,
                          not args.no_memory, clock)
            has_pml = "pml" in r
            t_ratio = r["ours"] / r["pml"] if has_pml else None
            m_ours, m_pml = r.get("ours_mem"), r.get("pml_mem")
            m_ratio = m_ours / m_pml if m_ours is not None and m_pml else None
            print(f"| {case} | {n} | {fmt(r['ours'], 2)} | {fmt(r.get('pml'), 2)} | {fmt(t_ratio, 2)} | "
                  f"{fmt(m_ours)} | {fmt(m_pml)} | {fmt(m_ratio, 2)} |", flush=True)


if __name__ == "__main__":
    main()
