"""The four seed systems' published effects, measured on the CJK glyph benchmark (SOP's shape).

Run by hand, not a test (each experiment takes 10-40 minutes on a 2-core CPU):

    python benchmarks/make_glyph_benchmark.py --out /tmp/cjk_glyphs         # once
    python benchmarks/bench_seeds.py paddle xbm centroids circle --json /tmp/seeds.json

Every run goes through ``deepmetric.Trainer`` on ``benchmarks/seeds/cjk_base.yaml`` plus the
overrides the seed system prescribes (printed with each table, so a row can be rerun with
``deepmetric train benchmarks/seeds/cjk_base.yaml KEY=VALUE ...``). Zero-shot throughout: the first
half of the characters train, a tenth of those is the validation split that selects each run's
checkpoint, the test characters are scored once. Experiments:

- ``paddle`` (001): softmax and ArcMargin stage one (random batches, SGD, lr / 10 twice), then the
  triplet, quadruplet (MSML), EML and N-pairs fine-tunes (P x 2 batches at stage one's final lr),
  each against *continuing stage one* for the same steps (``--resume`` of the stage-one run).
- ``xbm`` (003): the XBM contrastive loss at a small batch, without memory and with memories of
  several sizes (the hyperparameter the paper studies), plus the gradient each term sends.
- ``centroids`` (004): a query/gallery split of the test characters, a face family as the camera;
  per-image and centroid retrieval (``eval.centroids``) of batch-hard triplet and of batch-hard +
  the centroid triplet loss.
- ``circle`` (002): 10-fold verification on pairs of test characters (insightface protocol):
  circle loss pair and class level against batch-hard triplet and ArcFace, and a sweep of the
  relaxation margin m.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepmetric.config import Config, load_config  # noqa: E402
from deepmetric.data.protocol import resolve_classes  # noqa: E402
from deepmetric.engine.build import build_data  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE = HERE / "seeds" / "cjk_base.yaml"


class Runner:
    """Runs recipes (base + overrides) into a scratch folder and keeps every summary."""

    def __init__(self, root: str, work: Path, budget: Sequence[str], scale: float = 1.0) -> None:
        self.root, self.work, self.budget, self.scale = root, work, list(budget), scale
        self.records: List[Dict[str, Any]] = []
        #: which losses and memory sizes ``xbm`` runs (``--xbm-losses``, ``--xbm-sizes``)
        self.xbm_losses: Sequence[str] = ("contrastive_xbm", "multi_similarity")
        self.xbm_sizes: Sequence[int] = (1024, 4096, 16384)
        #: ``paddle`` trains on the first this many training characters only (``--paddle-classes``)
        self.paddle_classes: Optional[int] = None

    def steps(self, n: int) -> int:
        """``n`` steps times ``--scale`` (a multiple of 6, at least 6: evaluations divide it)."""
        return max(6, int(round(n * self.scale / 6)) * 6)

    def paddle_class_overrides(self) -> List[str]:
        """With ``paddle_classes`` N: train on the first N characters of the training half (a tenth of
        them validate), test on the whole other half as ever; else nothing."""
        if not self.paddle_classes:
            return []
        n_classes = sum(1 for p in Path(self.root).iterdir() if p.is_dir())
        # the training half as the recipe's own train_classes resolves it
        half = len(resolve_classes(self.config([]).data.train_classes, np.arange(n_classes), None, "train_classes"))
        if not 20 <= self.paddle_classes <= half:
            raise SystemExit(f"bench_seeds: --paddle-classes {self.paddle_classes}: needs 20 to {half} "
                             f"(the training half of {self.root})")
        return [f"data.train_classes={list(range(self.paddle_classes))}",
                f"data.test_classes={list(range(half, n_classes))}"]

    def config(self, overrides: Sequence[str]) -> Config:
        return load_config(BASE, [f"data.root={self.root}", *overrides, *self.budget])

    def train(self, name: str, overrides: Sequence[str], splits=None, resume_from: Optional[Path] = None,
              fresh_selection: bool = False) -> Dict[str, Any]:
        """Train ``BASE + overrides`` into ``work/name``; ``resume_from`` continues a copy of that run
        (its checkpoint ``last``), with selection restarted when ``fresh_selection``."""
        cfg = self.config(overrides)
        run_dir = self.work / name
        t0 = time.perf_counter()
        if resume_from is not None:
            shutil.copytree(resume_from, run_dir)
            trainer = Trainer(cfg, run_dir, resume=True, splits=splits)
            if fresh_selection:  # select among the continuation's own evaluations, as a fine-tune does
                trainer.selection.reset()
        else:
            trainer = Trainer(cfg, run_dir, splits=splits)
        summary = trainer.fit()
        logs = [r for r in trainer.history if "loss" in r]
        rec = {"name": name, "overrides": list(overrides), "test": summary["metrics"], "val": summary["val"],
               "untrained": summary.get("untrained"), "step": summary["step"], "last_step": summary["last_step"],
               "seconds": time.perf_counter() - t0, "run_dir": str(run_dir),
               "loss_curve": [(r["step"], r["loss"]) for r in logs],
               "val_curve": [(r["step"], r["eval"].get(cfg.eval.metric)) for r in trainer.history
                             if r.get("split") == "val"]}
        self.records.append(rec)
        print(f"  {name:<28} test {_short(rec['test'])}  (selected step {rec['step']}, "
              f"{rec['seconds']:.0f} s)", flush=True)
        return rec


KEYS = ("recall@1", "map@r", "map", "accuracy", "rank1", "centroid_rank1", "centroid_map")


def _short(metrics: Dict[str, Any]) -> str:
    return " ".join(f"{k} {metrics[k]:.4f}" for k in KEYS if isinstance(metrics.get(k), float))


def table(title: str, rows: List[Dict[str, Any]], keys: Sequence[str], command: str) -> str:
    out = [f"== {title}", f"   {command}", f"{'run':<30}" + "".join(f"{k:>16}" for k in keys) + f"{'step':>7}"]
    for r in rows:
        cells = "".join(f"{r['test'].get(k, float('nan')):>16.4f}" for k in keys)
        out.append(f"{r['name']:<30}{cells}{r['step']:>7}")
    return "\n".join(out)


def command_line(runner: Runner, overrides: Sequence[str]) -> str:
    quoted = " ".join(f"'{o}'" if any(ch in o for ch in " {}[],") else o for o in overrides)
    budget = " ".join(runner.budget)
    return f"deepmetric train {BASE.relative_to(HERE.parent)} data.root={runner.root} {quoted} {budget}".rstrip()


# -- 001: PaddlePaddle two-stage -------------------------------------------------------------------

def paddle(runner: Runner) -> List[str]:
    """Stage one (softmax / ArcMargin, random batches of 128, SGD momentum 0.9, weight decay 1e-4,
    lr 0.1 from scratch -- Paddle's 0.01 assumes ImageNet weights -- divided by 10 at 1/2 and 5/6 of
    the steps, as 15k and 25k of 30k), then fine-tunes at stage one's final lr (Paddle: 1e-4 = 0.01 x
    0.1^2, the same relation), P x 2 batches of 120 (EML 160), on the raw pooled features
    (embedding_dim 0), against stage one continued for the same steps."""
    steps_one, steps_two = runner.steps(900), runner.steps(300)
    fewer = runner.paddle_class_overrides()
    one = fewer + ["model.embedding_dim=0", "data.sampler=random", "data.batch_size=128", "optimizer.name=sgd",
           "optimizer.lr=0.1", "optimizer.momentum=0.9", "optimizer.weight_decay=0.0001",
           "scheduler.name=multistep", f"scheduler.milestones=[{steps_one // 2},{steps_one * 5 // 6}]",
           "scheduler.gamma=0.1", "scheduler.warmup_steps=0", f"train.max_steps={steps_one}",
           f"train.eval_every={steps_one // 6}", "eval.metric=recall@1", "eval.distance=squared_euclidean"]
    final_lr = 0.1 * 0.1 ** 2
    two = fewer + ["model.embedding_dim=0", "optimizer.name=sgd", f"optimizer.lr={final_lr}", "optimizer.momentum=0.9",
           "optimizer.weight_decay=0.0001", "scheduler.name=constant", "scheduler.warmup_steps=0",
           f"train.max_steps={steps_two}", f"train.eval_every={steps_two // 3}", "eval.metric=recall@1",
           "eval.distance=squared_euclidean", "data.samples_per_class=2", "data.classes_per_batch=60"]
    finetunes = {
        "triplet": ["losses=[{name: triplet, input: features, params: {margin: 0.1, mining: random, "
                    "distance: squared_euclidean, reduction: mean}}]"],
        "quadruplet": ["losses=[{name: quadruplet, input: features, params: {margin: 0.1}}]"],
        "eml": ["losses=[{name: eml, input: features}]", "data.classes_per_batch=80"],
        "npairs": ["losses=[{name: npairs, input: features, params: {normalize: false, l2_reg: 0.01}}]"],
    }
    stage_one_losses = {
        "softmax": "losses=[{name: softmax, input: features}]",
        "arcmargin": "losses=[{name: arcmargin, input: features, params: {scale: 80.0, margin: 0.15}}]",
    }
    tables = []
    for first, loss in stage_one_losses.items():
        rows = []
        s1 = runner.train(f"{first}", one + [loss])
        rows.append(s1)
        last = Path(s1["run_dir"]) / "checkpoints" / "last"
        cont = runner.train(f"{first}+continue", one + [loss, f"train.max_steps={steps_one + steps_two}",
                                                        f"train.eval_every={steps_two // 3}"],
                            resume_from=Path(s1["run_dir"]), fresh_selection=True)
        rows.append(cont)
        for name, extra in finetunes.items():
            rows.append(runner.train(f"{first}+{name}", two + extra + [f"model.init_from={last}"]))
        trained_on = (f", trained on the first {runner.paddle_classes} training characters "
                      f"(--paddle-classes; the command below omits their lists)" if fewer else "")
        tables.append(table(f"001 Paddle two-stage from {first} (stage one {steps_one} steps, "
                            f"then {steps_two} more{trained_on})", rows, ("recall@1", "recall@8", "map@r", "map"),
                            command_line(runner, one[len(fewer):] + [loss])))
    return tables


# -- 003: cross-batch memory -------------------------------------------------------------------------

def xbm(runner: Runner) -> List[str]:
    """The XBM contrastive loss (margin 0.5, sums over pairs) at a small batch (4 classes x 4), no
    memory against memories of 1k-16k embeddings (the training set is about 19k images), enqueued
    from 10% of the steps on (research-xbm: 1000 of 35000 after warm-up; a model trained from
    scratch drifts longer), weight 1; the same for multi-similarity. Then the gradient each term
    sends to the batch, on the trained no-memory model (``xbm_gradients``)."""
    steps = runner.steps(1500)
    small = ["data.classes_per_batch=4", "data.samples_per_class=4", f"train.max_steps={steps}",
             f"train.eval_every={steps // 6}"]
    start = steps // 10
    rows, tables = [], []
    for loss, params in (("contrastive_xbm", "{margin: 0.5}"), ("multi_similarity", "{}")):
        if loss not in runner.xbm_losses:
            continue
        rows = [runner.train(f"{loss} no memory", small + [f"losses=[{{name: {loss}, params: {params}}}]"])]
        for size in runner.xbm_sizes:
            rows.append(runner.train(
                f"{loss} memory {size}",
                small + [f"losses=[{{name: {loss}, params: {params}, memory: {{size: {size}, start_step: {start}}}}}]"]))
        tables.append(table(f"003 XBM: {loss}, batch 16 (4 x 4), {steps} steps, memory from step {start}",
                            rows, ("recall@1", "recall@8", "map@r", "map"),
                            command_line(runner, small + [f"losses=[{{name: {loss}, params: {params}, "
                                                          f"memory: {{size: SIZE, start_step: {start}}}}}]"])))
        if loss == "contrastive_xbm":
            tables.append(xbm_gradients(runner, Path(rows[0]["run_dir"]), small))
    return tables


def xbm_gradients(runner: Runner, run_dir: Path, small: Sequence[str], memory: int = 16384,
                  batches: int = 20) -> str:
    """On a trained model: fill a memory with ``memory`` training embeddings, then for ``batches``
    P x K batches compare the XBM contrastive loss's in-batch and memory terms: value, active pairs
    (positives with s < 1 - eps, negatives with s > margin) and the norm of d loss / d embeddings."""
    from deepmetric.engine.build import build_model, build_sampler
    from deepmetric.engine.checkpoint import load_model_weights, read_checkpoint
    from deepmetric.losses import CrossBatchMemory, build_loss

    cfg = runner.config(list(small) + ["losses=[{name: contrastive_xbm, params: {margin: 0.5}}]"])
    splits = build_data(cfg)
    model = build_model(cfg, load_weights=False)
    ckpt, _ = read_checkpoint(run_dir, prefer="best")
    load_model_weights(model, ckpt)
    model.eval()
    loss = build_loss("contrastive_xbm", margin=0.5)
    xbm_mod = CrossBatchMemory(loss, embedding_dim=model.embedding_dim, size=memory)
    sampler = build_sampler(cfg, splits.train.labels)

    def epochs():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from sampler
            epoch += 1

    plan = epochs()

    def batch():
        idx = next(plan)
        items = [splits.train[i] for i in idx]
        return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items])

    with torch.no_grad():
        while int(xbm_mod.filled) < memory:
            x, y = batch()
            xbm_mod.enqueue(model(x), y)
    stats = {"in-batch": [], "memory": []}
    for _ in range(batches):
        x, y = batch()
        with torch.no_grad():
            feats = model(x)
        e = feats.clone().requires_grad_(True)
        slots = xbm_mod.enqueue(e.detach(), y)
        for term, value in (("in-batch", loss(e, y)), ("memory", xbm_mod.memory_loss(e, y, slots))):
            (g,) = torch.autograd.grad(value, e)
            ref = None if term == "in-batch" else xbm_mod.memory[: int(xbm_mod.filled)]
            ref_y = y if ref is None else xbm_mod.memory_labels[: int(xbm_mod.filled)]
            s = e.detach() @ (e.detach() if ref is None else ref).T
            same = y[:, None] == ref_y[None, :]
            if ref is None:
                same.fill_diagonal_(False)
                other = ~same
                other.fill_diagonal_(False)
            else:
                other = ~same
            pos = (same & (s < 1 - 1e-5)).sum(1).float().mean()
            neg = (other & (s > 0.5)).sum(1).float().mean()
            stats[term].append((float(value), float(pos), float(neg), float(g.norm())))
    lines = [f"== 003 XBM gradients: trained no-memory model, batch 16, memory of {memory} training embeddings",
             f"{'term':<10}{'loss':>10}{'pos pairs/q':>13}{'neg pairs/q':>13}{'|grad|':>10}"]
    for term, vals in stats.items():
        v = np.asarray(vals).mean(0)
        lines.append(f"{term:<10}{v[0]:>10.3f}{v[1]:>13.1f}{v[2]:>13.1f}{v[3]:>10.3f}")
    return "\n".join(lines)


# -- 004: centroids ----------------------------------------------------------------------------------

def reid_list(root: str, queries_per_class: int = 2, seed: int = 0) -> str:
    """Write ``root/reid_list.csv`` (path, label, camera, split): the training characters (first
    half, code-point order) train; each test character's renders from ``queries_per_class`` distinct
    families (drawn with ``seed``) are queries, its other renders the gallery; a face's family is its
    camera, so the re-ID rule drops a query's same-family gallery renders. Returns the file name."""
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    family = {f["slug"]: f["family"] for f in manifest["faces"]}
    cameras = {f: i for i, f in enumerate(sorted(set(family.values())))}
    chars = manifest["characters_detail"]
    folders = sorted(c["folder"] for c in chars)
    train = set(folders[: int(round(0.5 * len(folders)))])
    rng = np.random.default_rng(seed)
    lines = ["path,label,camera,split"]
    for label, c in enumerate(sorted(chars, key=lambda c: c["folder"])):
        faces = c["faces"]
        if c["folder"] in train:
            split = ["train"] * len(faces)
        else:
            split = ["gallery"] * len(faces)
            seen: set = set()
            for i in rng.permutation(len(faces)):
                if len(seen) < queries_per_class and family[faces[i]] not in seen:
                    seen.add(family[faces[i]])
                    split[i] = "query"
        lines += [f"{c['folder']}/{f}.png,{label},{cameras[family[f]]},{s}" for f, s in zip(faces, split)]
    (Path(root) / "reid_list.csv").write_text("\n".join(lines) + "\n")
    return "reid_list.csv"


def centroids(runner: Runner) -> List[str]:
    """Centroids-ReID on the glyphs: batch-hard triplet (margin 0.5, Euclidean on the raw features,
    mean over anchors, the reference's form) against the same plus the centroid triplet loss
    (margin 0.5), BNNeck, 16 x 4 batches; each scored per image and against class centroids
    (camera-aware: a query's centroid from its character's renders of other families)."""
    file = reid_list(runner.root)
    steps = runner.steps(800)
    common = [f"train.max_steps={steps}", f"train.eval_every={steps // 4}", "data.format=csv", f"data.options={{file: {file}, split_column: split, camera_column: camera}}",
              "data.train_classes=null", "model.bnneck=true", "eval.protocol=reid", "eval.centroids=true",
              "eval.metric=map", "eval.distance=squared_euclidean"]
    triplet = "{name: triplet, input: features, params: {margin: 0.5, mining: hard, normalize: false, reduction: mean}}"
    ctl = "{name: centroid_triplet, input: features, params: {margin: 0.5}}"
    rows = [runner.train("batch-hard triplet", common + [f"losses=[{triplet}]"]),
            runner.train("triplet + centroid triplet", common + [f"losses=[{triplet}, {ctl}]"])]
    keys = ("rank1", "map", "centroid_rank1", "centroid_map")
    return [table("004 Centroids: per-image (rank1, map) and centroid (centroid_*) retrieval", rows, keys,
                  command_line(runner, common + [f"losses=[{triplet}, {ctl}]"]))]


# -- 002: circle loss --------------------------------------------------------------------------------

def verification_splits(cfg: Config, max_pairs: int = 6000, seed: int = 0):
    """The recipe's splits with the test characters as 10-fold verification pairs (balanced,
    ``deepmetric.data.protocol.verification_pairs``); only the images in a pair are kept."""
    from deepmetric.data.base import VerificationPairs
    from deepmetric.data.protocol import verification_pairs

    splits = build_data(cfg)
    pool = splits.query
    left, right, same, fold = verification_pairs(pool.labels, n_folds=10, max_pairs=max_pairs, seed=seed)
    used, inverse = np.unique(np.concatenate([left, right]), return_inverse=True)
    images = pool.subset(used, name="glyphs/pairs")
    splits.pairs = VerificationPairs(images, inverse[: len(left)], inverse[len(left):], same, fold)
    splits.query = splits.gallery = None
    return splits


def circle(runner: Runner) -> List[str]:
    """10-fold verification on 6,000 pairs of test characters (insightface protocol: plain + flipped
    embeddings summed, best squared-L2 threshold on nine folds applied to the tenth): circle loss
    pair level (retrieval setting m 0.4, gamma 80) and class level (face setting m 0.25, gamma 256)
    against batch-hard triplet and ArcFace (scale 64, margin 0.5); then class-level m swept."""
    steps = runner.steps(800)
    common = [f"train.max_steps={steps}", f"train.eval_every={steps // 4}", "eval.protocol=verification",
              "eval.metric=accuracy"]
    cfg = runner.config(common)
    splits = verification_splits(cfg)
    runs = {
        "circle pair (0.4, 80)": "{name: circle, params: {m: 0.4, gamma: 80.0}}",
        "circle class (0.25, 256)": "{name: circle_class, params: {m: 0.25, gamma: 256.0}}",
        "triplet batch-hard (0.1)": "{name: triplet, params: {margin: 0.1, mining: hard}}",
        "arcface (64, 0.5)": "{name: arcface, params: {scale: 64.0, margin: 0.5}}",
    }
    rows = [runner.train(name, common + [f"losses=[{loss}]"], splits=splits) for name, loss in runs.items()]
    keys = ("accuracy", "accuracy_std", "tar@far=1e-3", "auc")
    tables = [table("002 Circle loss: 10-fold verification on test-character pairs", rows, keys,
                    command_line(runner, common + ["losses=[LOSS]"]))]
    sweep = [r for r in rows if r["name"].startswith("circle class")]
    for m in (0.1, 0.4):
        sweep.append(runner.train(f"circle class ({m}, 256)", common + [
            f"losses=[{{name: circle_class, params: {{m: {m}, gamma: 256.0}}}}]"], splits=splits))
    tables.append(table("002 Circle loss, class level: the relaxation margin m", sweep, keys,
                        command_line(runner, common + ["losses=[{name: circle_class, params: {m: M, gamma: 256.0}}]"])))
    return tables


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    ap.add_argument("--root", default="/tmp/cjk_glyphs", help="folder written by make_glyph_benchmark.py")
    ap.add_argument("--set", dest="budget", nargs="*", default=[], help="overrides for every run, applied after the experiment's own")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every experiment's steps (0.02: a smoke run)")
    ap.add_argument("--work", help="scratch folder for the runs (default: a new one under /tmp)")
    ap.add_argument("--json", help="write every run's numbers here")
    ap.add_argument("--xbm-losses", nargs="+", default=["contrastive_xbm", "multi_similarity"],
                    choices=["contrastive_xbm", "multi_similarity"], help="the losses xbm runs with and without memory")
    ap.add_argument("--xbm-sizes", nargs="+", type=int, default=[1024, 4096, 16384], help="the memory sizes xbm tries")
    ap.add_argument("--paddle-classes", type=int, help="paddle trains on the first N training characters only "
                    "(its softmax / ArcMargin stage one must converge, which 1,575 classes do not in 900 steps)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("deepmetric").setLevel(logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_seeds_"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.root, work, args.budget, args.scale)
    runner.xbm_losses, runner.xbm_sizes = args.xbm_losses, args.xbm_sizes
    runner.paddle_classes = args.paddle_classes
    report: Dict[str, Any] = {"argv": sys.argv, "load_before": os.getloadavg(), "tables": {}}
    for name in args.experiments:
        print(f"-- {name}", flush=True)
        tables = EXPERIMENTS[name](runner)
        report["tables"][name] = tables
        for t in tables:
            print(t, flush=True)
    report["load_after"] = os.getloadavg()
    report["runs"] = runner.records
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 0


EXPERIMENTS: Dict[str, Callable[[Runner], List[str]]] = {
    "paddle": paddle, "xbm": xbm, "centroids": centroids, "circle": circle}

if __name__ == "__main__":
    raise SystemExit(main())
