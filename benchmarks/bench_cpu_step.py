"""Where a CPU training step's time goes, and what deepmetric's Trainer saves over a plain loop.

Two measurements on a recipe's data and network, each side alternating with the other on the same
inputs (median milliseconds per batch, one thread by default):

- **data**: a batch as a plain loop gets it (the training split's per-image pipeline, collated)
  against the Trainer's (a random affine drawn per image but warped once per batch,
  :func:`deepmetric.data.loading.affine_on_batch`; the same pixels);
- **model**: forward, backward and an AdamW step of the recipe's network in the default
  (contiguous, NCHW) memory order against NHWC (``train.channels_last``, ``auto`` on a CPU).

    .venv/bin/python benchmarks/bench_cpu_step.py --recipe benchmarks/fidelity/cjk_glyphs.yaml \\
        data.root=/tmp/cjk_glyphs
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepmetric.config import load_config  # noqa: E402
from deepmetric.data.loading import affine_on_batch  # noqa: E402
from deepmetric.engine.build import build_data, build_model  # noqa: E402


def alternate(sides: Dict[str, Callable[[int], object]], rounds: int) -> Dict[str, float]:
    """Median milliseconds of each side, called in turn ``rounds`` times with the round number."""
    times: Dict[str, List[float]] = {k: [] for k in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="benchmarks/fidelity/cjk_glyphs.yaml")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's setting)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.utils.data import default_collate

    cfg = load_config(args.recipe, args.overrides)
    torch.manual_seed(cfg.seed)
    train = build_data(cfg).train
    view, warp = affine_on_batch(train)
    d = cfg.data
    batch = d.classes_per_batch * d.samples_per_class
    plan = torch.randint(len(train), (args.rounds, batch)).tolist()

    def plain(r):
        return default_collate([train[i] for i in plan[r]])[0]

    def trainer(r):
        images = default_collate([view[i] for i in plan[r]])[0]
        return images if warp is None else warp(*images)

    data = alternate({"plain loop": plain, "deepmetric": trainer}, args.rounds)
    images = plain(0)
    model = build_model(cfg)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    sides = {}
    for name, net, x in (("NCHW", model, images), ("NHWC", nhwc, images.contiguous(memory_format=torch.channels_last))):
        opt = torch.optim.AdamW(net.parameters())

        def step(r, net=net, x=x, opt=opt):
            net(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sides[name] = step
    alternate(sides, 3)  # warm-up: oneDNN primitives are built on first use
    layout = alternate(sides, args.rounds)
    print(f"{args.recipe}: batch {batch}, {torch.get_num_threads()} thread(s), median of {args.rounds}")
    print("| part | plain loop ms | deepmetric ms | saved |\n|---|---|---|---|")
    for part, (a, b) in (("data (load, augment, collate)", (data["plain loop"], data["deepmetric"])),
                         ("model (forward, backward, AdamW)", (layout["NCHW"], layout["NHWC"]))):
        print(f"| {part} | {a:.1f} | {b:.1f} | {100 * (1 - b / a):.0f}% |")
    if warp is None:
        print("(the recipe's transform has no random affine to warp per batch: the data sides are the same)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
