"""k_reciprocal_rerank: input handling and invariants (equality with torchreid is in tests/parity)."""
import numpy as np
import pytest
import torch

from deepmetric.evaluation import k_reciprocal_rerank, pairwise_distances


def mats(n_q=12, n_g=30, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n_q + n_g, 6)))
    q, g = x[:n_q], x[n_q:]
    return [pairwise_distances(a, b, "euclidean").numpy() for a, b in ((q, g), (q, q), (g, g))]


def test_output_shape_dtype_range_and_torch_input():
    qg, qq, gg = mats()
    out = k_reciprocal_rerank(qg, qq, gg)
    assert out.shape == qg.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1 + 1e-6).all()
    out_t = k_reciprocal_rerank(*(torch.from_numpy(m).float() for m in (qg, qq, gg)), chunk_size=5)
    np.testing.assert_allclose(out, out_t, atol=1e-5)


def test_lambda_one_is_normalised_squared_distance():
    qg, qq, gg = mats(seed=1)
    out = k_reciprocal_rerank(qg, qq, gg, lambda_value=1.0)
    colmax = np.maximum((qq.astype(np.float32) ** 2).max(0), (qg.astype(np.float32) ** 2).max(1))
    np.testing.assert_allclose(out, (qg.astype(np.float32) ** 2) / colmax[:, None], rtol=1e-6)


def test_tiny_sets_and_errors():
    qg, qq, gg = mats(n_q=2, n_g=3, seed=2)
    assert k_reciprocal_rerank(qg, qq, gg, k1=20, k2=6).shape == (2, 3)  # k1 + 1 > Q + G
    with pytest.raises(ValueError, match="shapes"):
        k_reciprocal_rerank(qg, qq[:1], gg)
    with pytest.raises(ValueError, match="empty"):
        k_reciprocal_rerank(np.zeros((0, 3)), np.zeros((0, 0)), gg)
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_rerank(qg, qq, gg, k1=0)
