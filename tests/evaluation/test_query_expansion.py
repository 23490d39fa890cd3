"""Average query expansion: against a loop written from its definition, and what it does to metrics."""
import numpy as np
import pytest
import torch

from deepmetric.config import load_config
from deepmetric.engine.build import build_data, build_model
from deepmetric.engine.evaluator import Evaluator
from deepmetric.evaluation import average_query_expansion, reid_metrics_from_embeddings
from deepmetric.core.embeddings import EmbeddingSet
from deepmetric.quickstart import RECIPE


def naive_aqe(pool: np.ndarray, k: int, alpha: float, times: int) -> np.ndarray:
    """Per vector: cosines to the whole pool, the k largest (itself included, ties to the lower
    index), weights cos**alpha, mean of the weighted raw vectors; repeated `times` times."""
    x = pool.astype(np.float64)
    for _ in range(times):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        new = np.empty_like(x)
        for i in range(len(x)):
            sims = unit @ unit[i]
            order = sorted(range(len(x)), key=lambda j: (-sims[j], j))[:k]
            w = np.array([sims[j] ** alpha if float(alpha).is_integer() else max(sims[j], 0.0) ** alpha
                          for j in order])
            new[i] = np.mean(x[order] * w[:, None], axis=0)
        x = new
    return x


@pytest.mark.parametrize("k,alpha,times", [(5, 3.0, 1), (3, 1.0, 2), (4, 2.5, 1), (1, 3.0, 1)])
def test_matches_the_definition(k, alpha, times):
    rng = np.random.default_rng(k)
    q, g = rng.normal(size=(7, 6)), rng.normal(size=(19, 6))
    nq, ng = average_query_expansion(torch.from_numpy(q), torch.from_numpy(g), k=k, alpha=alpha, times=times)
    expected = naive_aqe(np.concatenate([q, g]), k, alpha, times)
    assert nq.dtype == torch.float64
    np.testing.assert_allclose(torch.cat([nq, ng]).numpy(), expected, rtol=1e-10, atol=1e-12)
    alone = average_query_expansion(q.astype(np.float32), k=k, alpha=alpha, times=times)  # leave-one-out
    assert alone.dtype == torch.float32
    np.testing.assert_allclose(alone.numpy(), naive_aqe(q, k, alpha, times), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(nq).all()


def test_k_one_keeps_the_vectors_and_bad_arguments_fail():
    x = torch.randn(5, 3)
    torch.testing.assert_close(average_query_expansion(x, k=1), x)  # its own neighbour, weight 1
    with pytest.raises(ValueError, match="k and times must be >= 1"):
        average_query_expansion(x, k=0)


def test_expansion_pulls_noisy_views_of_an_identity_together():
    """Clustered re-ID-like data: each identity is a centre plus large noise; averaging a vector with
    its nearest neighbours denoises it, so mAP rises (as FastReID reports for AQE)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 32))
    pids = np.repeat(np.arange(30), 6)
    x = centres[pids] + 0.9 * rng.normal(size=(len(pids), 32))
    cams = np.tile(np.arange(6), 30)
    is_q = cams == 0
    q = EmbeddingSet(torch.from_numpy(x[is_q]).float(), pids[is_q], cams[is_q])
    g = EmbeddingSet(torch.from_numpy(x[~is_q]).float(), pids[~is_q], cams[~is_q])
    before = reid_metrics_from_embeddings(q, g, distance="cosine")
    eq, eg = average_query_expansion(q.vectors, g.vectors, k=5, alpha=3.0)
    after = reid_metrics_from_embeddings(EmbeddingSet(eq, q.labels, q.camids), EmbeddingSet(eg, g.labels, g.camids),
                                         distance="cosine")
    assert after["map"] > before["map"] + 0.02, (before["map"], after["map"])


def test_evaluator_applies_it_from_the_recipe(tiny_overrides):
    cfg = load_config(RECIPE, tiny_overrides)
    splits = build_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    plain = Evaluator(cfg, splits, torch.device("cpu")).run(model, neighbours=False)
    qe_cfg = load_config(RECIPE, [*tiny_overrides, "eval.query_expansion={k: 3, alpha: 3.0}"])
    expanded = Evaluator(qe_cfg, splits, torch.device("cpu")).run(model, neighbours=False)
    direct = average_query_expansion(plain.query.vectors, k=3, alpha=3.0)
    torch.testing.assert_close(expanded.query.vectors, direct)
    assert expanded.metrics["map@r"] != plain.metrics["map@r"]
