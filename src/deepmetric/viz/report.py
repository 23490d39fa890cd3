"""``report.html``: one self-contained page (images inlined) with the pictures of a run or evaluation."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..core.files import atomic_write
from ..core.results import EvalResult, RetrievalResults
from . import plots

#: the metrics drawn as curves over training, when computed
CURVES = ("recall@1", "map@r", "map", "rank1", "accuracy")


def _ks(metrics: Dict[str, Any]) -> List[int]:
    return sorted(int(k.split("@")[1]) for k in metrics if k.startswith("recall@"))


def projection_of(cfg=None) -> str:
    """The report's embedding projection: ``eval.projection`` of the recipe (``pca`` without one)."""
    return getattr(getattr(cfg, "eval", None), "projection", "pca")


def write_eval_plots(out_dir: Path, result: EvalResult, cfg=None, dataset=None, before: Optional[Dict[str, Any]] = None,
                     gallery_dataset=None, class_names: Optional[Dict[int, str]] = None,
                     after_name: str = "trained") -> List[Path]:
    """Pictures of one evaluation: Recall@K (beside ``before``, the untrained network's, if given),
    a retrieval grid, an embedding projection (``eval.projection`` of ``cfg``: PCA by default, or
    t-SNE, UMAP, none), ROC. ``class_names`` labels grids and legends."""
    out = Path(out_dir) / "plots"
    made: List[Path] = []
    m = result.metrics
    ks = _ks(m)
    if ks:
        cols = {"untrained": before, after_name: m} if before else {"model": m}
        made.append(plots.recall_bars(out / "recall_at_k.png", cols, ks))
    nb = result.neighbours
    ref_ds = dataset if result.gallery is None else gallery_dataset
    if nb is not None and dataset is not None and ref_ds is not None and len(result.query):
        bound = RetrievalResults.from_eval(result, dataset=dataset, gallery_dataset=gallery_dataset,
                                           class_names=class_names)
        made.append(plots.retrieval_grid(out / "retrieval_grid.png", bound, bound.pick_queries(4, wrong_first=4),
                                         title="top: random queries; bottom: queries whose first neighbour is wrong"))
    method = projection_of(cfg)
    if method != "none" and result.protocol != "verification" and result.query is not None and len(result.query):
        made.append(plots.projection_plot(out / "projection.png", result.query.vectors.numpy(), result.query.labels,
                                          class_names=class_names, method=method))
    if result.pairs is not None:
        made.append(plots.roc_plot(out / "roc.png", result.pairs.distances, result.pairs.is_same))
    return made


def _history(run_dir: Path, history: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    if not history and (run_dir / "metrics.jsonl").is_file():
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return history


def _curves(out: Path, history: List[Dict[str, Any]]) -> List[Path]:
    figs: List[Path] = []
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if losses:
        figs.append(plots.curve_plot(out / "loss.png", {"loss": losses}, "training loss", "loss"))
    evals = [h for h in history if "eval" in h]
    if evals:
        series: Dict[str, list] = {}
        for h in evals:
            split = h.get("split", "eval")
            for k in CURVES:
                if isinstance(h["eval"].get(k), float):
                    series.setdefault(f"{split} {k}", []).append((h["step"], h["eval"][k]))
        figs.append(plots.curve_plot(out / "metrics.png", series, "evaluation during training (step 0: untrained)",
                                     "value"))
    return figs


def _metric_table(summary: Dict[str, Any]) -> str:
    from .summary import shown_metrics

    untrained = summary.get("untrained") or {}
    chosen = "selected" if summary.get("selected_by") else "last step"
    cols = []
    if summary.get("val") is not None:
        cols.append(("validation", untrained.get("val"), summary["val"]))
    cols.append(("test", untrained.get("test"), summary.get("metrics") or {}))
    keys = shown_metrics(*(t for _, a, b in cols for t in (a, b)))

    def cell(t, k):
        v = (t or {}).get(k)
        return f"<td>{v:.4f}</td>" if isinstance(v, float) else "<td>-</td>"

    head = ("<tr><th></th>" + "".join(f'<th colspan="2">{n}</th>' for n, _, _ in cols) + "</tr><tr><th>metric</th>"
            + "".join(f"<th>untrained</th><th>{chosen}</th>" for _ in cols) + "</tr>")
    rows = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(cell(a, k) + cell(b, k) for _, a, b in cols) + "</tr>"
                   for k in keys)
    return f"<table>{head}{rows}</table>"


def _plain_table(metrics: Dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else
                   f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                   for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def write_run_report(trainer: Any, summary: Dict[str, Any]) -> Path:
    """:func:`write_report` of a finished training run, from the trainer's ``run_dir``, ``history``,
    ``last_result`` (the selected checkpoint's test), ``cfg`` and ``splits`` (the test query and
    gallery, class names): what :class:`~deepmetric.engine.callbacks.WriteReport` is given."""
    s = trainer.splits
    return write_report(trainer.run_dir, trainer.history, trainer.last_result, cfg=trainer.cfg, summary=summary,
                        dataset=s.query, gallery_dataset=s.gallery, class_names=s.class_names)


def write_report(run_dir: Path, history: List[Dict[str, Any]], result: EvalResult, cfg=None, dataset=None,
                 summary: Optional[Dict[str, Any]] = None, gallery_dataset=None,
                 class_names: Optional[Dict[int, str]] = None) -> Path:
    """The run's page: the end-of-run table (untrained beside the selected checkpoint, validation
    and test, and which step was selected), training curves and the test evaluation's pictures."""
    from .summary import describe_selection

    run_dir = Path(run_dir)
    history = _history(run_dir, history)
    figs = _curves(run_dir / "plots", history)
    before = (summary or {}).get("untrained", {}).get("test")
    after_name = "selected" if (summary or {}).get("selected_by") else "last step"
    figs += write_eval_plots(run_dir, result, cfg, dataset, before, gallery_dataset, class_names, after_name)
    table = _metric_table(summary) if summary else _plain_table(result.metrics)
    selection = f"<p>{html.escape(describe_selection(summary))}</p>" if summary else ""
    imgs = "\n".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem.replace('_', ' ')}</figcaption></figure>" for p in figs)
    name = html.escape(cfg.name if cfg is not None else run_dir.name)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>deepmetric report: {name}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 10px;text-align:right}}
figure{{display:inline-block;margin:8px;vertical-align:top}}img{{max-width:520px}}</style></head>
<body><h1>deepmetric report: {name}</h1>
<p>run directory <code>{html.escape(str(run_dir))}</code></p>
<h2>metrics</h2>{table}{selection}
<h2>pictures</h2>{imgs}</body></html>"""
    return atomic_write(run_dir / "report.html", page)
