"""What a run prints when it ends: the untrained network beside the selected checkpoint.

The summary (``Trainer.fit()``'s return value, also ``metrics.json``) holds the test metrics of the
selected checkpoint, its validation metrics, the untrained network's on both, and which step was
selected and how. :func:`format_summary` lays it out as a table.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

#: shown first, in this order, when computed; then any other score
LEADING = ("recall@1", "recall@2", "recall@4", "recall@8", "recall@10", "map@r", "map", "r_precision", "mrr",
           "rank1", "rank5", "minp", "centroid_rank1", "centroid_map", "accuracy", "auc", "tar@far=1e-3")
#: counts and duplicates, not scores
HIDDEN = {"num_queries", "skipped_queries", "precision@1", "accuracy_std", "threshold", "cmc"}


def shown_metrics(*tables: Optional[Dict[str, Any]]) -> List[str]:
    """The score names to print: those of :data:`LEADING` first, then the rest, counts left out."""
    present = [k for t in tables if t for k, v in t.items() if isinstance(v, float) and k not in HIDDEN]
    ordered = [k for k in LEADING if k in present]
    return ordered + sorted(set(present) - set(ordered))


def _cell(table: Optional[Dict[str, Any]], key: str) -> str:
    v = (table or {}).get(key)
    return f"{v:.4f}" if isinstance(v, float) else "-"


def format_summary(summary: Dict[str, Any], title: Optional[str] = None) -> str:
    """The end-of-run table: untrained vs selected, validation then test, and how it was selected."""
    untrained = summary.get("untrained") or {}
    val, test = summary.get("val"), summary.get("metrics") or {}
    sizes = summary.get("splits") or {}
    chosen = "selected" if summary.get("selected_by") else "fold-chosen" if summary.get("length_folds") else "last step"
    columns = []
    if val is not None:
        columns += [(f"validation ({sizes.get('val') or '?'})", untrained.get("val"), val)]
    columns += [(f"test ({sizes.get('test') or '?'})", untrained.get("test"), test)]
    keys = shown_metrics(*(t for _, a, b in columns for t in (a, b)))
    width = max([len(k) for k in keys] + [8])
    head1 = " " * width + "".join(f"  {name:^22}" for name, _, _ in columns)
    head2 = f"{'metric':<{width}}" + "".join(f"  {'untrained':>10} {chosen:>11}" for _ in columns)
    lines = ([title] if title else []) + [head1.rstrip(), head2]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"  {_cell(a, k):>10} {_cell(b, k):>11}" for _, a, b in columns))
    lines.append(describe_selection(summary))
    return "\n".join(lines)


def describe_selection(summary: Dict[str, Any]) -> str:
    """One sentence: which step the numbers are of, and why that one."""
    step, last, total = summary.get("step"), summary.get("last_step"), summary.get("max_steps")
    if summary.get("selected_by"):
        early = f", stopped early at step {last}" if summary.get("stopped_early") else ""
        return (f"selected step {step} of {total} by {summary['selected_by']} "
                f"({summary.get('evaluations', '?')} evaluations{early}); the test split was scored once, "
                f"on that checkpoint")
    folds = summary.get("length_folds")
    if folds:
        compared = folds.get("candidates") or []
        which = (f"; candidate {folds['candidate'] + 1} of the {len(compared)} train.fold_candidates"
                 if len(compared) > 1 else "")
        return (f"step {step}, a length chosen on {folds['folds']} folds of the training classes (their mean "
                f"validation {folds['metric']} there {folds['val']:.4f}, untrained {folds['untrained']:.4f}{which}); "
                f"the test split was scored once, on the last step")
    return (f"step {step} of {total}, the last: not selected (no validation split; set data.val_classes "
            f"to select on classes held out of training)")
