"""The report's 2-D projections: t-SNE keeps clusters apart and is seeded; UMAP is used when
umap-learn is there, PCA with a warning when it is not; few points or an unknown name."""
from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from deepmetric.viz import plots


def clusters(per=20, classes=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 6
    y = np.repeat(np.arange(classes), per)
    return (centers[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y


def nearest_neighbour_agreement(xy, y):
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((y[d.argmin(1)] == y).mean())


def test_tsne_keeps_clusters_apart_and_is_seeded():
    v, y = clusters()
    xy, name = plots._project(v, "tsne", seed=3)
    assert name == "t-SNE" and xy.shape == (60, 2)
    assert nearest_neighbour_agreement(xy, y) == 1.0
    np.testing.assert_array_equal(xy, plots._project(v, "tsne", seed=3)[0])


def test_umap_without_umap_learn_draws_pca_with_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    v, _ = clusters()
    with caplog.at_level(logging.WARNING):
        xy, name = plots._project(v, "umap", seed=0)
    assert name == "PCA" and "umap-learn is not installed" in caplog.text
    np.testing.assert_array_equal(xy, plots._project(v, "pca", seed=0)[0])


def test_umap_is_called_with_two_components_and_the_seed(monkeypatch):
    calls = []

    class UMAP:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def fit_transform(self, v):
            return v[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=UMAP))
    v, _ = clusters()
    xy, name = plots._project(v, "umap", seed=5)
    assert name == "UMAP" and calls == [{"n_components": 2, "random_state": 5}]
    np.testing.assert_array_equal(xy, v[:, :2] * 2)


def test_few_points_fall_back_to_pca_and_unknown_names_are_refused():
    v, _ = clusters(per=3)  # 9 points: too few for a neighbour embedding
    assert plots._project(v, "tsne", seed=0)[1] == "PCA"
    with pytest.raises(ValueError, match="unknown projection 'isomap'"):
        plots._project(v, "isomap", seed=0)


def test_projection_plot_with_tsne_writes_the_figure(tmp_path):
    v, y = clusters()
    path = plots.projection_plot(tmp_path / "projection.png", v, y, method="tsne")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
