"""Trainer overhead: steps/s of deepmetric's Trainer against a bare PyTorch loop, same run.

Both sides train the same model (from the same initial weights) with the same loss, optimizer and
batches (the PKBatchSampler's batches of the same dataset), for the same number of steps, without
evaluation or checkpoints in the timed window. Reported: median steps/s over repeats and the
overhead ``1 - ours / bare``. Target: overhead <= 5%.

    .venv/bin/python benchmarks/bench_train_overhead.py --steps 200 --repeats 3
    .venv/bin/python benchmarks/bench_train_overhead.py --recipe configs/fashion_mnist.yaml --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def bare_loop(model, loss_fn, opt, loader, sampler, steps, device, nhwc=False):
    """The plain loop a user would write: the same DataLoader and sampler, no logging or checks;
    in the Trainer's memory order (``nhwc``: layout is not overhead, ``bench_cpu_step.py`` times it)."""
    model.train()
    t0 = time.perf_counter()
    done, epoch = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            if done == steps:
                break
            done += 1
            if nhwc:
                images = images.contiguous(memory_format=torch.channels_last)
            _step(model, loss_fn, opt, images, labels, device)
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _step(model, loss_fn, opt, images, labels, device):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model.forward_train(images)["embedding"], labels)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from deepmetric.config import load_config
    from deepmetric.engine.trainer import Trainer

    torch.set_num_threads(torch.get_num_threads())
    over = [f"train.max_steps={args.steps}", "train.eval_every=0", "train.progress=false",
            f"train.log_every={args.steps}", f"train.device={args.device}", "scheduler.name=constant",
            "scheduler.warmup_steps=0", "eval.untrained=false", *args.overrides]
    cfg = load_config(args.recipe, over)
    device = torch.device(args.device)
    ours, bare = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, f"{tmp}/run")
            import copy

            from deepmetric.data import PKBatchSampler
            from torch.utils.data import DataLoader

            sampler = PKBatchSampler(trainer.splits.train.labels, cfg.data.classes_per_batch,
                                     cfg.data.samples_per_class, seed=cfg.seed)
            loader = DataLoader(trainer.splits.train, batch_sampler=sampler, **trainer.loader_settings.kwargs())

            model = copy.deepcopy(trainer.model)
            loss_fn = copy.deepcopy(trainer.losses[0])
            o = cfg.optimizer  # the same optimizer a user would write by hand
            params = list(model.parameters()) + list(loss_fn.parameters())
            opt = {"sgd": lambda: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
                   "adam": lambda: torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay),
                   "adamw": lambda: torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)}[o.name]()
            tb = bare_loop(model, loss_fn, opt, loader, sampler, args.steps, device, trainer.channels_last)
            # time the trainer's loop only (evaluation and checkpointing happen after the last step)
            t0 = time.perf_counter()
            orig = trainer._evaluate_and_checkpoint
            done = {}

            def stop_clock(*a, **k):
                done["t"] = time.perf_counter() - t0
                return orig(*a, **k)

            trainer._evaluate_and_checkpoint = stop_clock
            trainer.fit()
            to = done["t"]
        ours.append(args.steps / to)
        bare.append(args.steps / tb)
        print(f"repeat {r}: trainer {args.steps / to:.1f} steps/s, bare loop {args.steps / tb:.1f} steps/s")
    o, b = statistics.median(ours), statistics.median(bare)
    print("\n| recipe | device | steps | trainer steps/s | bare steps/s | overhead |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.recipe} | {args.device} | {args.steps} | {o:.1f} | {b:.1f} | {100 * (1 - o / b):+.1f}% |")


if __name__ == "__main__":
    main()
