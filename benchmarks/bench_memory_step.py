"""Step time of a recipe with a cross-batch memory, against the same recipe without it and PML's
MultiSimilarity step, alternating the three on the same batches (so machine noise hits all alike).

    .venv/bin/python benchmarks/bench_memory_step.py --recipe benchmarks/fidelity/cjk_glyphs.yaml \\
        data.root=/tmp/cjk_glyphs

The memory is filled first (``--warm`` steps of the memory recipe); then, for ``--rounds`` passes
over ``--batches`` preloaded batches, each batch is one step of each side: deepmetric's
``Trainer.train_step`` with the recipe, the same with the recipe's first loss without its memory,
and a plain PML step (``MultiSimilarityLoss`` + ``MultiSimilarityMiner(0.1)``, AdamW) on a copy of
the same network. Loading is excluded (it is the same for all). Prints median and quartile step
times in ms, one thread by default.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepmetric.config import load_config  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="benchmarks/fidelity/cjk_glyphs.yaml")
    ap.add_argument("--warm", type=int, default=310, help="memory-recipe steps before timing (fills it)")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's setting)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_memory_step_") as work:
        return _run(args, Path(work))


def _run(args: argparse.Namespace, work: Path) -> int:
    from pytorch_metric_learning import losses, miners

    base = ["train.eval_every=0", "eval.untrained=false", "train.progress=false"] + args.overrides

    def trainer(extra):
        torch.manual_seed(0)
        cfg = load_config(args.recipe, base + extra)
        t = Trainer(cfg, work / f"run{len(extra)}")
        t.model.train()
        t.losses.train()
        return t, cfg

    with_memory, cfg = trainer([])
    first = cfg.losses[0]
    if first.memory is None:
        raise SystemExit(f"bench_memory_step: {args.recipe}: its first loss has no memory")
    # the same first loss without its memory (JSON is YAML: the override parses back to the same loss)
    without, _ = trainer(["losses=" + json.dumps([dict(cfg.to_dict()["losses"][0], memory=None)])])
    source = with_memory._batches()
    batches = [next(source)[:2] for _ in range(args.batches)]
    model = copy.deepcopy(without.model)
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(0.1)

    def pml(images, labels):
        emb = model(images)
        loss = loss_fn(emb, labels, miner(emb, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ours(t):
        def step(images, labels):
            t.step += 1
            t.train_step(images, labels)
        return step

    sides = {"deepmetric, memory": ours(with_memory), "deepmetric, no memory": ours(without), "PML MS": pml}
    for i in range(args.warm):
        sides["deepmetric, memory"](*batches[i % len(batches)])
    memory = with_memory.losses[0]
    print(f"memory holds {int(memory.filled)} of {memory.size} after {args.warm} steps")
    times = {k: [] for k in sides}
    for _ in range(args.rounds):
        for images, labels in batches:
            for name, step in sides.items():
                t0 = time.perf_counter()
                step(images, labels)
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        ts = sorted(ts)
        q = lambda f: ts[int(f * (len(ts) - 1))] * 1000  # noqa: E731
        print(f"{name:24s} median {q(0.5):7.1f} ms   quartiles {q(0.25):.1f} - {q(0.75):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
