"""``report.html``: one self-contained page (images inlined) with the pictures of a run or evaluation."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from . import plots


def _ks(metrics: Dict[str, Any]) -> List[int]:
    return sorted(int(k.split("@")[1]) for k in metrics if k.startswith("recall@"))


def write_eval_plots(out_dir: Path, result, cfg=None, dataset=None, before: Optional[Dict[str, Any]] = None,
                     gallery_dataset=None) -> List[Path]:
    """Pictures of one evaluation: Recall@K, worst/sample retrieval grid, projection, ROC."""
    out = Path(out_dir) / "plots"
    made: List[Path] = []
    m = result.metrics
    ks = _ks(m)
    if ks:
        cols = {"untrained": before, "trained": m} if before else {"model": m}
        made.append(plots.recall_bars(out / "recall_at_k.png", cols, ks))
    nb = result.extras.get("neighbours")
    ref_ds = dataset if result.gallery is None else gallery_dataset
    if nb is not None and dataset is not None and ref_ds is not None and len(result.query):
        idx, qlab = nb["indices"], result.query.labels
        ref = result.gallery if result.gallery is not None else result.query
        wrong = np.flatnonzero(ref.labels[idx[:, 0]] != qlab)[:4]
        sample = np.random.default_rng(0).choice(len(qlab), size=min(4, len(qlab)), replace=False)
        rows = np.concatenate([sample, wrong]).astype(int)
        made.append(plots.retrieval_grid(out / "retrieval_grid.png", dataset.load, rows, idx, qlab, ref.labels,
                                         load_ref=ref_ds.load,
                                         title="top: random queries; bottom: queries whose first neighbour is wrong"))
    if result.query is not None and len(result.query) and result.extras.get("distances") is None:
        names = getattr(dataset, "class_names", None)
        made.append(plots.projection_plot(out / "projection.png", result.query.vectors.numpy(), result.query.labels,
                                          class_names=names))
    if result.extras.get("distances") is not None:
        made.append(plots.roc_plot(out / "roc.png", result.extras["distances"], result.extras["is_same"]))
    return made


def write_report(run_dir: Path, history: List[Dict[str, Any]], result, cfg=None, dataset=None,
                 before: Optional[Dict[str, Any]] = None, gallery_dataset=None) -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    figs: List[Path] = []
    if not history and (run_dir / "metrics.jsonl").is_file():
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if losses:
        figs.append(plots.curve_plot(out / "loss.png", {"loss": losses}, "training loss", "loss"))
    evals = [(h["step"], h["eval"]) for h in history if "eval" in h]
    if evals:
        keys = [k for k in ("recall@1", "map@r", "map", "rank1", "accuracy") if k in evals[-1][1]]
        series = {k: [(s, e[k]) for s, e in evals if k in e] for k in keys}
        figs.append(plots.curve_plot(out / "metrics.png", series, "evaluation during training", "value"))
    figs += write_eval_plots(run_dir, result, cfg, dataset, before, gallery_dataset)
    rows = []
    for k, v in result.metrics.items():
        if isinstance(v, (int, float)):
            b = before.get(k) if before else None
            rows.append(f"<tr><td>{html.escape(k)}</td>" + (f"<td>{b:.4f}</td>" if isinstance(b, float) else ("<td></td>" if before else ""))
                        + f"<td>{v:.4f}</td></tr>" if isinstance(v, float) else
                        f"<tr><td>{html.escape(k)}</td>{'<td></td>' if before else ''}<td>{v}</td></tr>")
    head = "<tr><th>metric</th>" + ("<th>untrained</th>" if before else "") + "<th>trained</th></tr>"
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
<h2>metrics</h2><table>{head}{''.join(rows)}</table>
<h2>pictures</h2>{imgs}</body></html>"""
    from ..config import atomic_write_text

    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
