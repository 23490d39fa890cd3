"""``RUN/report.html`` of ``deepmetric tune``: the default (trial 0) beside the best trial, on validation
and test; Optuna's optimisation history, parameter importances and validation curves (PNG, inlined);
every trial in a table.

Takes what :class:`deepmetric.engine.tune.Search` returns (duck-typed: ``run_dir``, ``study``,
``default``, ``best``, ``test``), so this layer needs neither the engine nor a trainer.
"""
from __future__ import annotations

import base64
import html
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import matplotlib

from ..core.files import atomic_write
from . import plots

#: the metrics the table shows, on validation and on test
SHOWN = ("map@r", "recall@1")
#: Optuna's figures: (file stem, caption, function of optuna.visualization.matplotlib, axis labels in
#: place of Optuna's, x and y, None: Optuna's)
FIGURES = (
    ("optimization_history", "validation MAP@R of each trial, and the best so far", "plot_optimization_history",
     (None, "validation MAP@R")),
    ("param_importances", "parameter importances (fANOVA over the complete trials)", "plot_param_importances",
     (None, None)),
    ("intermediate_values", "each trial's best validation MAP@R so far, at each of its evaluations (pruned "
     "trials stop early)", "plot_intermediate_values", ("evaluation", "best validation MAP@R so far")),
)


def optuna_figures(study: Any, out: Path) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """Draw :data:`FIGURES` for ``study`` into ``out``; ``(made, notes)``: the PNGs with captions, and
    why a figure could not be drawn (parameter importances need two complete trials)."""
    from optuna.visualization import matplotlib as drawing

    made, notes = [], []
    for stem, caption, name, (xlabel, ylabel) in FIGURES:
        # Optuna's plots set a style: kept inside; its matplotlib plots are "experimental": not our warning
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = getattr(drawing, name)(study)
            except (ValueError, RuntimeError) as e:
                notes.append(f"{caption}: not drawn ({e})")
                continue
            axes.set_xlabel(xlabel or axes.get_xlabel())
            axes.set_ylabel(ylabel or axes.get_ylabel())
            made.append((plots._save(axes.figure, out / f"{stem}.png"), caption))
    return made, notes


def describe_params(params: Dict[str, Any]) -> str:
    """``loss=triplet, lr=0.002``: a trial's parameters, floats to 4 digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def compared(result: Any) -> List[Tuple[str, Any]]:
    """``(label, trial)``: the default, then the best trial (one row when the default is the best)."""
    default, best = result.default, result.best
    if default is None:
        return [("best", best)]
    return [("default = best", best)] if default.number == best.number else [("default", default), ("best", best)]


def format_tune_summary(result: Any) -> str:
    """What ``deepmetric tune`` prints at the end: the counts, the best trial and its parameters, and
    the default beside the best, on validation and test."""
    c, best, default = result.counts, result.best, result.default
    failed = f", {c['fail']} failed" if c["fail"] else ""
    lines = [f"tune: {c['complete'] + c['pruned']} trials ({c['complete']} complete, {c['pruned']} pruned{failed}) "
             f"in {result.seconds / 60:.1f} min; study {Path(result.run_dir) / 'study.db'}",
             f"best: trial {best.number}, validation map@r {best.value:.4f}"
             + (f" (the default, trial {default.number}: {default.value:.4f})" if default is not None else ""),
             f"  {describe_params(best.params)}",
             f"  {'':<20} {'val map@r':>10} {'test map@r':>11} {'test recall@1':>14}"]
    for label, t in compared(result):
        test = result.test.get(t.number, {})
        lines.append(f"  {f'{label} ({t.number})':<20} {t.value:>10.4f} {_number(test.get('map@r')):>11} "
                     f"{_number(test.get('recall@1')):>14}")
    lines.append(f"wrote {result.best_yaml} (`deepmetric train {result.best_yaml}` repeats the best trial); the test "
                 f"classes were scored after the search, once per trial shown")
    cut = best.user_attrs.get("stopped_by_time")
    if cut is not None:
        lines.append(f"note: --time stopped trial {best.number} at step {cut} of {best.user_attrs.get('max_steps')}; "
                     f"{result.best_yaml} trains all of them")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"<td>{value:.4f}</td>" if isinstance(value, float) else f"<td>{html.escape(str(value))}</td>" \
        if value is not None else "<td>-</td>"


def comparison_table(result: Any) -> str:
    """The default beside the best trial: validation and test, :data:`SHOWN` metrics."""
    head = "<tr><th></th>" + "".join(f"<th>validation {m}</th>" for m in SHOWN) + "".join(
        f"<th>test {m}</th>" for m in SHOWN) + "</tr>"
    body = ""
    for label, t in compared(result):
        label = f"{label} (trial {t.number})"
        val: Dict[str, Any] = t.user_attrs.get("val") or {}
        test = result.test.get(t.number, {})
        body += f"<tr><td>{html.escape(label)}</td>" + "".join(_cell(val.get(m)) for m in SHOWN) + "".join(
            _cell(test.get(m)) for m in SHOWN) + "</tr>"
    return f"<table>{head}{body}</table>"


def trials_table(study: Any) -> str:
    """Every trial: state, validation MAP@R, steps, time, parameters."""
    head = "<tr><th>trial</th><th>state</th><th>validation map@r</th><th>steps</th><th>seconds</th><th>parameters</th></tr>"
    body = ""
    for t in study.trials:
        attrs = t.user_attrs
        params = describe_params(t.params)
        note = " (default)" if attrs.get("default") else ""
        steps = f"{attrs['steps']}/{attrs['max_steps']}" if "steps" in attrs else None
        body += (f"<tr><td>{t.number}{note}</td>{_cell(t.state.name.lower())}{_cell(t.value)}{_cell(steps)}"
                 f"{_cell(round(attrs['seconds']) if 'seconds' in attrs else None)}"
                 f'<td style="text-align:left">{html.escape(params or attrs.get("error", ""))}</td></tr>')
    return f"<table>{head}{body}</table>"


def write_tune_report(result: Any) -> Path:
    """``RUN/report.html`` (and ``RUN/plots/*.png``) of a finished search."""
    run_dir = Path(result.run_dir)
    figs, notes = optuna_figures(result.study, run_dir / "plots")
    imgs = "\n".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for p, caption in figs)
    said = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    best = describe_params(result.best.params)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>deepmetric tune: {html.escape(run_dir.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 10px;text-align:right}}
figure{{display:inline-block;margin:8px;vertical-align:top}}img{{max-width:520px}}</style></head>
<body><h1>deepmetric tune: {html.escape(run_dir.name)}</h1>
<p>study <code>{html.escape(str(run_dir / 'study.db'))}</code>; the best trial's recipe
<code>{html.escape(str(run_dir / 'best.yaml'))}</code>: {html.escape(best)}</p>
<h2>the default against the best trial</h2>{comparison_table(result)}
<p>Trials were scored and selected on the validation classes only; the test classes were scored once,
after the search, for the best trial and the default.</p>
<h2>the search</h2>{imgs}{said}
<h2>every trial</h2>{trials_table(result.study)}</body></html>"""
    return atomic_write(run_dir / "report.html", page)
