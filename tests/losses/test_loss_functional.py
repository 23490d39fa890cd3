"""The shared math: masks, log-sum-exp, AvgNonZero, and the hand-written backward passes
(checked with torch.autograd.gradcheck in float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses import functional as fn
from deepmetric.losses.classification import _CosineLogits
from deepmetric.losses.miners import triplet_margin_terms


def test_label_masks_in_batch_and_with_exclusion():
    y = torch.tensor([0, 0, 1, 2**24, 2**24 + 1])
    pos, neg = fn.label_masks(y)
    assert not pos.diagonal().any() and not neg.diagonal().any()
    assert pos[0, 1] and not pos[3, 4] and neg[3, 4]  # 2**24 and 2**24 + 1 differ
    ref = torch.tensor([0, 1, 0, 2])
    pos, neg = fn.label_masks(y[:3], ref, torch.tensor([2, -1, 1]))
    assert pos.tolist() == [[True, False, False, False], [True, False, True, False], [False, False, False, False]]
    assert neg.tolist() == [[False, True, False, True], [False, True, False, True], [True, False, True, True]]


def test_masked_logsumexp_empty_rows_and_far_tails():
    x = torch.tensor([[0.0, -500.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = fn.masked_logsumexp(x, mask)
    torch.testing.assert_close(out[0], torch.logsumexp(torch.tensor([0.0, -500.0], dtype=torch.float64), 0))
    assert out[1] == float("-inf")
    assert fn.softplus(out)[1] == 0  # log(1 + empty sum)


def test_avg_nonzero_value_and_weights():
    value, weight = fn.avg_nonzero(torch.tensor([0.0, 2.0, 0.0, 4.0]))
    assert value == 3.0 and weight.tolist() == [0.0, 0.5, 0.0, 0.5]
    value, weight = fn.avg_nonzero(torch.zeros(3))
    assert value == 0.0 and weight.sum() == 0


def test_gram_backward():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn._Gram.apply, (x,))


def _toy_loss(s, need_grad):
    # an arbitrary smooth function of the similarity matrix with a known gradient
    w = torch.arange(s.numel(), dtype=s.dtype).view_as(s) % 3 - 1.0
    value = (w * s).sum() + (s ** 2).sum()
    return value, (w + 2 * s if need_grad else None)


def _sparse_toy_loss(s, need_grad):
    w = torch.zeros_like(s)
    w[0, 1], w[2, 0] = 1.5, -2.0
    return (w * s).sum(), (w if need_grad else None)


@pytest.mark.parametrize("toy", [_toy_loss, _sparse_toy_loss], ids=["dense", "sparse"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_similarity_loss_backward(toy, with_ref):
    q = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 3, dtype=torch.float64, requires_grad=True) if with_ref else None
    inputs = (q, r) if with_ref else (q,)
    assert torch.autograd.gradcheck(lambda *t: fn.similarity_loss(t[0], t[1] if with_ref else None, toy), inputs)
    # and the same numbers as autograd through F.normalize
    qn = F.normalize(q, dim=1)
    s = qn @ (F.normalize(r, dim=1) if with_ref else qn).T
    torch.testing.assert_close(fn.similarity_loss(q, r, toy), toy(s, False)[0])


def test_similarity_loss_without_grad():
    q = torch.randn(4, 3)
    with torch.no_grad():
        assert fn.similarity_loss(q, None, _toy_loss).requires_grad is False


@pytest.mark.parametrize("k", [1, 3])
def test_cosine_logits_backward(k):
    x = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).requires_grad_(True)
    w = torch.randn(4 * k, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _CosineLogits.apply(a, b, 2.5, k), (x, w))
    ref = (2.5 * x @ F.normalize(w, dim=1).T).view(5, 4, k).amax(2)
    torch.testing.assert_close(_CosineLogits.apply(x, w, 2.5, k), ref)


@pytest.mark.parametrize("semihard", [False, True])
def test_triplet_margin_terms_against_brute_force(semihard):
    g = torch.Generator().manual_seed(3)
    d = torch.rand(7, 9, generator=g, dtype=torch.float64)
    d[0, 3] = d[0, 5]  # ties between a positive and a negative distance
    pos = torch.rand(7, 9, generator=g) < 0.3
    neg = ~pos & (torch.rand(7, 9, generator=g) < 0.8)
    value, grad = triplet_margin_terms(d, pos, neg, 0.25, semihard, True)
    dd = d.clone().requires_grad_(True)
    terms = []
    for a in range(7):
        for p in pos[a].nonzero().flatten():
            for n in neg[a].nonzero().flatten():
                if semihard and not dd[a, n] > dd[a, p]:
                    continue
                terms.append(torch.relu(dd[a, p] - dd[a, n] + 0.25))
    nonzero = [t for t in terms if t > 0]
    expected = sum(nonzero) / len(nonzero)
    (expected_grad,) = torch.autograd.grad(expected, dd)
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad, expected_grad)


def test_chain_unit_distance_matches_autograd():
    s = torch.tensor([[1.0, 0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    for kind in fn.DISTANCES:  # s = 1 sits on the euclidean clamp: gradient 0 there, as autograd
        ref = {"euclidean": (2 - 2 * s).clamp_min(0).clamp_min(1e-12).sqrt(),
               "squared_euclidean": (2 - 2 * s).clamp_min(0), "cosine": 1 - s}[kind]
        (expected,) = torch.autograd.grad(ref.sum(), s)
        dist = fn.unit_distances(s.detach(), kind)
        torch.testing.assert_close(dist, ref.detach())
        torch.testing.assert_close(fn.chain_unit_distance_(torch.ones_like(dist), dist, kind), expected)
