"""The ``deepmetric`` command. Each subcommand composes library parts; none holds logic of its own.

Bad input (a ``UserError``: missing file, unknown key, wrong value, corrupt image) prints one line
and exits with code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .config import RECIPES, list_recipes, resolve_recipe  # noqa: F401  (RECIPES: re-exported)
from .errors import UserError

log = logging.getLogger("deepmetric")


# -- handlers --------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .engine.trainer import Trainer

    if args.config and "=" in args.config:  # `train --resume RUN key=value`: no recipe, only overrides
        args.overrides = [args.config, *args.overrides]
        args.config = None
    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_config(run_dir, [])
        changed = load_config(run_dir, args.overrides)
        bad = [o.split("=", 1)[0] for o in args.overrides if not o.startswith("train.")]
        if bad:
            raise ConfigError(f"--resume: only train.* keys may change when resuming, not {bad[0]}")
        cfg = changed
    else:
        if not args.config:
            raise ConfigError("train: give a recipe (e.g. configs/fashion_mnist.yaml) or --resume RUN_DIR")
        cfg = load_config(resolve_recipe(args.config), args.overrides)
        run_dir = Path(args.run_dir or cfg.run_dir or f"runs/{cfg.name}")
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume))
    summary = trainer.fit()
    if not trainer.is_main:  # under torchrun, rank 0 alone prints and writes
        return 0
    from .viz.summary import format_summary
    from .viz.report import write_report

    print(format_summary(summary, title=f"{cfg.name}:"))
    report = write_report(run_dir, trainer.history, trainer.last_result, cfg=cfg, summary=summary,
                          dataset=trainer.splits.query, gallery_dataset=trainer.splits.gallery,
                          class_names=trainer.splits.class_names)
    print(f"run directory: {run_dir}  (report: {report}; `deepmetric eval {run_dir}` scores the same checkpoint)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.build import build_data, build_model
    from .engine.checkpoint import load_model_weights, read_checkpoint
    from .engine.evaluator import Evaluator
    from torch import device as torch_device

    from .engine.trainer import resolve_device
    from .config import atomic_write_text

    target = Path(args.target)
    run_dir = None
    if target.is_dir() and (target / "config.yaml").is_file():
        run_dir = target
        cfg = load_config(target, args.overrides)
        ckpt_path = args.checkpoint or target
        out_dir = Path(args.output or target)
    else:
        cfg = load_config(resolve_recipe(args.target), args.overrides)
        if not args.checkpoint:
            from .config import ConfigError

            raise ConfigError("eval: a recipe needs --checkpoint PATH (or pass a run directory)")
        ckpt_path = args.checkpoint
        out_dir = Path(args.output or Path(ckpt_path).parent)
    if args.neighbours < 0 or (args.neighbours and cfg.eval.protocol == "verification"):
        from .errors import UserError

        raise UserError(f"eval --neighbours {args.neighbours}: give K >= 1 for a retrieval or re-ID protocol "
                        f"(this recipe's protocol is {cfg.eval.protocol})")
    from .engine.distributed import init_distributed

    ckpt, ckpt_state = read_checkpoint(ckpt_path)
    dist = init_distributed()  # under torchrun each rank embeds a shard; rank 0 writes
    device = resolve_device(cfg.train.device)
    if dist.is_distributed and device.type == "cuda":
        device = torch_device("cuda", dist.local_rank)
    splits = build_data(cfg)
    if run_dir is not None and not any(o.startswith("data.") for o in args.overrides):
        check_recorded_splits(run_dir, splits)
    model = build_model(cfg, load_weights=False)
    load_model_weights(model, ckpt)
    model.to(device).eval()
    result = Evaluator(cfg, splits, device).run(model)
    if not dist.is_main:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"checkpoint": str(ckpt), "step": ckpt_state.get("step"), **result.metrics}
    previous = _read_json(out_dir / "metrics.json")
    if previous.get("checkpoint") == str(ckpt) and previous.get("step") == written["step"] and not args.overrides:
        # the training summary's facts about this checkpoint (untrained, validation, selection) stay
        written.update({k: v for k, v in previous.items() if k not in written and k not in result.metrics})
    atomic_write_text(out_dir / "metrics.json", json.dumps(written, indent=1))
    from .viz.report import write_eval_plots

    plots = write_eval_plots(out_dir, result, cfg=cfg, dataset=splits.query, gallery_dataset=splits.gallery,
                             class_names=splits.class_names)
    _print_metrics(f"eval {ckpt} (step {ckpt_state.get('step')})", result.metrics)
    print(f"wrote {out_dir / 'metrics.json'} and {len(plots)} plots")
    if args.neighbours:
        path = _write_neighbours(out_dir / "neighbours.jsonl", result, args.neighbours, cfg.eval.distance)
        print(f"wrote {path}: the top {args.neighbours} of each query")
    return 0


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_recorded_splits(run_dir: Path, splits) -> None:
    """Refuse to score a run on another test set than it was tested on (``splits.json``)."""
    from .data.protocol import describe_splits, split_differences

    recorded = _read_json(run_dir / "splits.json")
    if not recorded:
        log.warning("%s has no splits.json (a run from an older version): the test split is not checked",
                    run_dir)
        return
    diffs = split_differences(recorded, describe_splits(splits), "test")
    if not diffs:
        return
    how = ("the run was trained on splits given in Python (Trainer(..., splits=...)), which its config cannot "
           "rebuild: evaluate it in Python with the same splits (model, cfg, _ = deepmetric.load_for_inference(RUN); "
           "deepmetric.Evaluator(cfg, splits).run(model))"
           if recorded.get("source") == "python" else
           "the data changed since training, or pass data.* overrides to score other data on purpose")
    raise UserError(f"{run_dir / 'splits.json'}: the config now builds another test split than the run's: "
                    f"{'; '.join(diffs)}; {how}")


def _write_neighbours(path: Path, result, k: int, distance: str) -> Path:
    """``neighbours.jsonl``: one line per query with its top-``k`` (see evaluation.results)."""
    from .config import atomic_write_text
    from .evaluation.results import retrieval_results

    q, g = result.query, result.gallery
    ref = q if g is None else g
    res = retrieval_results(q.vectors, q.labels, None if g is None else g.vectors, None if g is None else g.labels,
                            k=k, distance=distance, query_camids=q.camids,
                            gallery_camids=None if g is None else g.camids)
    lines = (json.dumps(r) for r in res.records(q.labels, ref.labels, q.paths, ref.paths))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def cmd_data_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.check import find_unreadable, format_summary, summarize
    from .engine.build import build_data

    cfg = load_config(resolve_recipe(args.config), args.overrides)
    splits = build_data(cfg)
    print(format_summary(summarize(splits)))
    bad_total = 0
    for name in ("train", "query", "gallery"):
        ds = getattr(splits, name)
        if ds is None or ds.paths is None:
            continue
        bad = find_unreadable(ds)
        bad_total += len(bad)
        for path, reason in bad[: args.max_listed]:
            print(f"unreadable ({name}): {path}: {reason}")
    if bad_total:
        print(f"{bad_total} unreadable images")
        return 1
    print("all images readable")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(run_dir=args.run_dir, overrides=args.overrides)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .engine.build import _register_formats
    from .registry import BACKBONES, DATASETS, LOSSES
    from . import losses as _losses  # noqa: F401  (registers losses)

    _register_formats()
    tables = {"losses": LOSSES.names(), "backbones": BACKBONES.names() + ["timm:<any timm model>"],
              "datasets": DATASETS.names(), "recipes": list_recipes()}
    for what in ([args.what] if args.what else tables):
        print(f"{what}: {', '.join(tables[what])}")
    return 0


def _print_metrics(title: str, metrics: dict) -> None:
    print(title)
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k:<24} {v:.4f}")
        elif isinstance(v, int):
            print(f"  {k:<24} {v}")


# -- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepmetric", description="Deep metric learning: train, evaluate, ship.")
    p.add_argument("--version", action="version", version=f"deepmetric {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quickstart", help="train and evaluate on real digits (about a minute on a CPU)")
    q.add_argument("--run-dir", default="runs/quickstart")
    q.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. train.max_steps=100)")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train a recipe: deepmetric train CONFIG [key=value ...]")
    t.add_argument("config", nargs="?", help="recipe YAML (or packaged recipe name)")
    t.add_argument("overrides", nargs="*", help="key=value overrides (e.g. train.max_steps=100)")
    t.add_argument("--run-dir", help="where to write the run (default runs/<name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run directory or a recipe with --checkpoint")
    e.add_argument("target", metavar="RUN_DIR_OR_CONFIG")
    e.add_argument("overrides", nargs="*", help="key=value overrides (e.g. eval.rerank=true)")
    e.add_argument("--checkpoint", help="checkpoint directory (default: the run's best)")
    e.add_argument("--output", help="where to write metrics.json and plots")
    e.add_argument("--neighbours", type=int, default=0, metavar="K",
                   help="also write neighbours.jsonl: each query's top K, with distances and relevance")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("data", help="inspect a recipe's data")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dc = dsub.add_parser("check", help="summary per split and unreadable images")
    dc.add_argument("config")
    dc.add_argument("overrides", nargs="*")
    dc.add_argument("--max-listed", type=int, default=20)
    dc.set_defaults(func=cmd_data_check)

    ls = sub.add_parser("list", help="registered losses, backbones, datasets and packaged recipes")
    ls.add_argument("what", nargs="?", choices=["losses", "backbones", "datasets", "recipes"])
    ls.set_defaults(func=cmd_list)

    for module in ("deepmetric.inference.cli", "deepmetric.serve.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`train CFG --run-dir D key=value`)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.WARNING if args.quiet else logging.INFO
    if int(os.environ.get("RANK", "0") or 0) > 0:  # under torchrun, rank 0 speaks for all ranks
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"deepmetric: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepmetric: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
