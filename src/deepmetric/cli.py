"""The ``deepmetric`` command. Each subcommand composes library parts; none holds logic of its own.

Bad input (a ``UserError``: missing file, unknown key, wrong value, corrupt image) prints one line
and exits with code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .core import __version__
from .core.errors import UserError
from .inference import cli as inference_cli
from .serve import cli as serve_cli

log = logging.getLogger("deepmetric")

#: the packages of the optional dependencies commands import, by module name, and the extra that brings each
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "sklearn": "scikit-learn",
            "safetensors": "safetensors", "scipy": "scipy", "matplotlib": "matplotlib", "tensorboard": "tensorboard",
            "optuna": "optuna"}
EXTRAS = {**{package: "train" for package in PACKAGES.values()}, "optuna": "tune"}


# -- handlers --------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .engine.callbacks import WriteReport
    from .engine.runs import trainer_for
    from .viz.report import write_run_report
    from .viz.summary import format_summary

    if args.config and "=" in args.config:  # `train --resume RUN key=value`: no recipe, only overrides
        args.overrides = [args.config, *args.overrides]
        args.config = None
    report = WriteReport(write_run_report)  # part of the run: a tracker logs it
    trainer = trainer_for(args.config, args.overrides, args.run_dir, args.resume, callbacks=[report])
    summary = trainer.fit()
    if not trainer.is_main:  # under torchrun, rank 0 alone prints and writes
        return 0
    run_dir = trainer.run_dir
    print(format_summary(summary, title=f"{trainer.cfg.name}:"))
    print(f"run directory: {run_dir}  (report: {report.path}; `deepmetric eval {run_dir}` scores the same checkpoint)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna  # first: without the `tune` extra, one line says so before anything is read

    from .engine.tune import Search, option_seconds, tune_base
    from .engine.tune_space import describe_space
    from .viz.tune_report import format_tune_summary, write_tune_report

    if args.space:
        print(describe_space())
        return 0
    if not args.target:
        raise UserError("tune: give your images (a folder with a subfolder per class, or a list file) or a recipe")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search says what it does itself
    seconds = option_seconds("--time", args.time)
    base = tune_base(args.target, args.overrides)
    for line in base.lines:
        log.info("%s", line)
    run_dir = args.run_dir or f"runs/tune_{base.config.name}"
    search = Search(base, run_dir, time=seconds, trial_budget=args.trial_budget, trials=args.trials,
                    pruner=args.pruner)
    result = search.run()
    report = write_tune_report(result)
    print(format_tune_summary(result))
    print(f"report: {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.runs import evaluate
    from .viz.report import write_eval_plots

    ev = evaluate(args.target, args.overrides, args.checkpoint, args.output, args.neighbours)
    if not ev.is_main:
        return 0
    plots = write_eval_plots(ev.out_dir, ev.result, cfg=ev.cfg, dataset=ev.splits.query,
                             gallery_dataset=ev.splits.gallery, class_names=ev.splits.class_names)
    _print_metrics(f"eval {ev.checkpoint} (step {ev.step})", ev.result.metrics)
    print(f"wrote {ev.out_dir / 'metrics.json'} and {len(plots)} plots")
    if ev.neighbours is not None:
        print(f"wrote {ev.neighbours}: the top {args.neighbours} of each query")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .config import load_config, resolve_recipe
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
    from .config import list_recipes
    from .data.formats import DATASETS
    from .losses import LOSSES, MINERS
    from .models import BACKBONES

    tables = {"losses": LOSSES.names(), "miners": MINERS.names(),
              "backbones": BACKBONES.names() + ["timm:<any timm model>"],
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

class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the command's ``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deepmetric", description="Deep metric learning: train, evaluate, ship.")
    p.add_argument("--version", action="version", version=f"deepmetric {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quickstart", help="train and evaluate on glyphs of the typefaces matplotlib ships (under a minute on a CPU)")
    q.add_argument("--run-dir", default="runs/quickstart")
    q.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. train.max_steps=100)")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train on your images or a recipe: deepmetric train DIR_LIST_OR_RECIPE [key=value ...]")
    t.add_argument("config", nargs="?", metavar="DATA_OR_RECIPE",
                   help="your images (a folder with a subfolder per class, or a .csv/.txt list of 'path label': "
                        "a recipe is written from the data), or a recipe YAML (or packaged recipe name)")
    t.add_argument("overrides", nargs="*", help="key=value overrides (e.g. train.max_steps=100)")
    t.add_argument("--run-dir", help="where to write the run (default runs/<name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.set_defaults(func=cmd_train)

    tu = sub.add_parser("tune", help="search hyperparameters with Optuna on validation MAP@R: "
                                     "deepmetric tune DIR_LIST_OR_RECIPE --time 30m [key=value ...]")
    tu.add_argument("target", nargs="?", metavar="DATA_OR_RECIPE",
                    help="your images (a folder with a subfolder per class, or a list file: the automatic recipe "
                         "is the first trial) or a recipe")
    tu.add_argument("overrides", nargs="*", help="key=value overrides of the base recipe (train.max_steps=N: "
                                                 "trials of N steps)")
    tu.add_argument("--time", help="the whole search (e.g. 30m, 1h); the same command again resumes it")
    length = tu.add_mutually_exclusive_group()
    length.add_argument("--trial-budget", help="each trial's train.time_budget (default: --time / --trials, "
                                               "or a tenth of --time)")
    length.add_argument("--trials", type=int, help="stop at N finished trials (the study's, resumed ones included)")
    tu.add_argument("--pruner", default="median", choices=["median", "asha"],
                    help="stop poor trials early: the median rule or ASHA (successive halving)")
    tu.add_argument("--run-dir", help="the study, its trials, best.yaml and report.html (default runs/tune_<name>)")
    tu.add_argument("--space", action="store_true", help="print the search space and exit")
    tu.set_defaults(func=cmd_tune)

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

    ls = sub.add_parser("list", help="registered losses, miners, backbones, datasets and packaged recipes")
    ls.add_argument("what", nargs="?", choices=["losses", "miners", "backbones", "datasets", "recipes"])
    ls.set_defaults(func=cmd_list)

    inference_cli.register(sub)
    serve_cli.register(sub)
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
        code = int(args.func(args) or 0)
        if "torch.distributed" in sys.modules:  # under torchrun: the ranks leave together, not one by one
            from .core.distributed import leave_process_group

            leave_process_group()
        return code
    except UserError as e:
        if args.debug:
            raise
        print(f"deepmetric: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency this command needs
        package = PACKAGES.get((e.name or "").split(".")[0])
        if package is None or args.debug:
            raise
        print(f"deepmetric: error: {args.command} needs {package}, which is not installed: "
              f"pip install 'deepmetric[{EXTRAS[package]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepmetric: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
