"""Retrieval results bound to their images draw themselves (figure, HTML page, notebook), by class
name; the report's grid is the same figure; the report's projection is PCA by default, or none."""
from __future__ import annotations

import base64
import re
import time

import numpy as np
import pytest
from matplotlib.figure import Figure

from deepmetric.core.embeddings import EmbeddingSet
from deepmetric.core.results import COLOURS, EvalResult, RetrievalResults
from deepmetric.data.base import DataSplits
from deepmetric.data.formats.arrays import ArrayDataset
from deepmetric.evaluation.results import retrieval_results
from deepmetric.viz import plots
from deepmetric.viz.report import write_eval_plots

NAMES = {0: "circle", 1: "square", 2: "cross"}


def _result(n_per: int = 6, seed: int = 0):
    """Three classes of 8x8 images whose embeddings are the class centre plus noise: a few mistakes."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per)
    vectors = (np.eye(3)[labels] * 1.0 + 0.6 * rng.normal(size=(len(labels), 3))).astype(np.float32)
    images = (rng.integers(0, 255, size=(len(labels), 8, 8))).astype(np.uint8)
    ds = ArrayDataset(images, labels, name="toy")
    query = EmbeddingSet(vectors, labels)
    nb = retrieval_results(query.vectors, query.labels, k=5)
    return EvalResult({"recall@1": float(nb.relevant[:, 0].mean())}, query, None, neighbours=nb), \
        DataSplits(train=None, query=ds, class_names=NAMES)


def test_plot_frames_and_names_every_neighbour():
    result, splits = _result()
    rr = result.retrieval(splits)
    assert isinstance(rr, RetrievalResults) and rr.class_names == NAMES
    fig = rr.plot(n_queries=4, top_k=3, queries=[0, 7, 13, 5])
    assert isinstance(fig, Figure)
    axes = np.array(fig.axes).reshape(4, 4)
    for r, q in enumerate([0, 7, 13, 5]):
        assert axes[r, 0].get_title() == f"query: {NAMES[int(result.query.labels[q])]}"
        for j in range(3):
            ax = axes[r, j + 1]
            g = int(rr.indices[q, j])
            ok = bool(rr.relevant[q, j])
            assert ax.get_title().startswith(NAMES[int(result.query.labels[g])])
            want = COLOURS["relevant" if ok else "wrong"]
            assert ax.spines["left"].get_edgecolor()[:3] == pytest.approx(_rgb(want), abs=1e-3)
            assert ax.get_images(), "each cell shows its image"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["same class", "another class"]
    assert not any(re.fullmatch(r"\d+( [✓✗])?", a.get_title()) for a in fig.axes), "names, not label numbers"


def _rgb(hex_colour: str):
    return tuple(int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))


def test_wrong_and_right_neighbours_both_appear_and_top_k_is_checked():
    result, splits = _result()
    rr = RetrievalResults.from_eval(result, splits)
    assert rr.relevant.any() and (~rr.relevant).any()
    with pytest.raises(ValueError, match="top 5"):
        rr.plot(top_k=6)
    with pytest.raises(ValueError, match="queries"):
        rr.plot(queries=[99])
    unbound = result.neighbours
    with pytest.raises(ValueError, match="from_eval"):
        unbound.plot()
    assert "unbound" in repr(unbound)


def test_to_html_is_self_contained_and_atomic(tmp_path):
    result, splits = _result()
    rr = result.retrieval(splits)
    page = rr.to_html(tmp_path / "sub" / "retrieval.html", n_queries=3, top_k=4)
    text = page.read_text()
    assert not [p for p in page.parent.iterdir() if p.name.endswith(".tmp")]
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) == 3 * 5
    assert base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in text.replace("<!doctype html>", "")
    for name in NAMES.values():
        assert name in text
    assert text.count(COLOURS["relevant"]) + text.count(COLOURS["wrong"]) >= 3 * 4


def test_notebook_repr():
    result, splits = _result()
    rr = result.retrieval(splits)
    assert repr(rr).startswith("RetrievalResults(18 queries, top 5, leave-one-out, 3 query classes")
    html = rr._repr_html_()
    assert html.count("data:image/png;base64,") == 4 * (1 + 5) and "square" in html


def test_images_from_paths_when_no_dataset(tmp_path, image_folder):
    from deepmetric.inference.predictor import list_inputs

    inputs = list_inputs(image_folder)
    labels = np.asarray(inputs.labels)
    rng = np.random.default_rng(0)
    query = EmbeddingSet(rng.normal(size=(len(labels), 4)).astype(np.float32), labels, paths=inputs.paths)
    nb = retrieval_results(query.vectors, query.labels, k=3)
    rr = RetrievalResults.from_eval(EvalResult({}, query, None, neighbours=nb),
                                    class_names=dict(enumerate(inputs.class_names)))
    fig = rr.plot(n_queries=2, top_k=3)
    assert fig.axes[0].get_images()[0].get_array().shape[-1] == 3, "RGB from the file"
    assert fig.axes[0].get_title() in {f"query: {c}" for c in inputs.class_names}


def test_report_grid_is_the_shared_figure_and_projection_defaults_to_pca(tmp_path, monkeypatch):
    result, splits = _result(n_per=20)
    drawn = []
    real_plot, real_project = RetrievalResults.plot, plots._project
    monkeypatch.setattr(RetrievalResults, "plot", lambda self, **kw: drawn.append(kw) or real_plot(self, **kw))
    methods = []
    monkeypatch.setattr(plots, "_project", lambda v, m, s: methods.append(m) or real_project(v, m, s))
    start = time.perf_counter()
    made = write_eval_plots(tmp_path, result, dataset=splits.query, class_names=NAMES)
    assert time.perf_counter() - start < 8
    assert {p.name for p in made} == {"recall_at_k.png", "retrieval_grid.png", "projection.png"}
    assert len(drawn) == 1 and drawn[0]["top_k"] == 5
    assert methods == ["pca"]


def test_projection_none_and_pca_is_deterministic(tmp_path):
    from deepmetric.config import load_config

    result, splits = _result(n_per=20)
    cfg = load_config(None, ["eval.projection=none"])
    made = write_eval_plots(tmp_path / "a", result, cfg=cfg, dataset=splits.query, class_names=NAMES)
    assert "projection.png" not in {p.name for p in made}
    v = result.query.vectors.numpy()
    a, name = plots._project(v, "pca", 0)
    b, _ = plots._project(v, "pca", 1)
    assert name == "PCA" and a.shape == (len(v), 2)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match="projection"):
        load_config(None, ["eval.projection=mds"])


def test_projection_is_subsampled_and_named_by_class(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 50)  # 1500 points of 30 classes
    v = rng.normal(size=(len(labels), 8)).astype(np.float32)
    seen = []
    real = plots._project
    monkeypatch.setattr(plots, "_project", lambda x, m, s: seen.append(x.shape) or real(x, m, s))
    plots.projection_plot(tmp_path / "p.png", v, labels, class_names={c: f"class-{c}" for c in range(30)})
    assert seen[0][0] <= 1000 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
