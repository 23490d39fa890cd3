"""Value and gradient parity with pytorch-metric-learning 2.9.0 (float32 and float64).

Conventions bridged here: PML margins for ArcFace are degrees (ours radians); PML stores class
matrices as (D, C) (``pml.W.data = ours.weight.T``); PML's miners are passed as ``indices_tuple``.
Every PML call uses ``ref_emb=None`` so its identity-based self-pair rule matches our index rule.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import require_module

PML = "the dev extra (pytorch-metric-learning==2.9.0, make test installs it)"
pml_losses = require_module("pytorch_metric_learning.losses", PML)
pml_miners = require_module("pytorch_metric_learning.miners", PML)
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance  # noqa: E402

from deepmetric.losses import CrossBatchMemory, build_loss  # noqa: E402

DTYPES = [torch.float32, torch.float64]
# rtol 1e-5 elementwise; atol relative to the tensor's scale, because in float32 both libraries round
# gradient entries to ~2e-6 of the largest entry (e.g. circle loss, gamma=128: PML's own float32
# gradient is 7e-6 off its float64 gradient), and small entries cannot be 1e-5-relative exact.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_close(actual, expected, dtype):
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=ATOL[dtype] * scale)


def pk(n=32, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) // k
    return y[torch.randperm(n, generator=g)]


def embeddings(n=32, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def value_and_grad(fn, x, y, params=()):
    x = x.clone().requires_grad_(True)
    value = fn(x, y)
    grads = torch.autograd.grad(value, [x, *params])
    return value.detach(), grads


def mined(loss, miner):
    return lambda x, y: loss(x, y, miner(x, y))


PAIR_CASES = {
    "triplet_all": (dict(name="triplet", margin=0.1), lambda: pml_losses.TripletMarginLoss(margin=0.1)),
    "triplet_all_squared": (dict(name="triplet", margin=0.3, distance="squared_euclidean"),
                            lambda: pml_losses.TripletMarginLoss(0.3, distance=LpDistance(power=2))),
    "triplet_all_cosine": (dict(name="triplet", margin=0.2, distance="cosine"),
                           lambda: pml_losses.TripletMarginLoss(0.2, distance=CosineSimilarity())),
    "triplet_all_raw": (dict(name="triplet", margin=0.5, normalize=False),
                        lambda: pml_losses.TripletMarginLoss(0.5, distance=LpDistance(normalize_embeddings=False))),
    "triplet_hard_raw": (dict(name="triplet", margin=0.5, mining="hard", normalize=False),
                         lambda: mined(pml_losses.TripletMarginLoss(0.5, distance=LpDistance(normalize_embeddings=False)),
                                       pml_miners.BatchHardMiner(distance=LpDistance(normalize_embeddings=False)))),
    "triplet_hard": (dict(name="triplet", margin=0.2, mining="hard"),
                     lambda: mined(pml_losses.TripletMarginLoss(0.2), pml_miners.BatchHardMiner())),
    "triplet_semihard": (dict(name="triplet", margin=0.2, mining="semihard"),
                         lambda: mined(pml_losses.TripletMarginLoss(0.2),
                                       pml_miners.TripletMarginMiner(0.2, type_of_triplets="semihard"))),
    "contrastive": (dict(name="contrastive"), lambda: pml_losses.ContrastiveLoss()),
    "contrastive_margins": (dict(name="contrastive", pos_margin=0.3, neg_margin=1.2),
                            lambda: pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2)),
    "multi_similarity": (dict(name="multi_similarity"), lambda: pml_losses.MultiSimilarityLoss()),
    "multi_similarity_mined": (dict(name="multi_similarity", miner_epsilon=0.1),
                               lambda: mined(pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner(0.1))),
    "circle": (dict(name="circle"), lambda: pml_losses.CircleLoss()),
    "circle_reid": (dict(name="circle", m=0.25, gamma=128.0), lambda: pml_losses.CircleLoss(m=0.25, gamma=128)),
    "supcon": (dict(name="supcon"), lambda: pml_losses.SupConLoss()),
    "ntxent": (dict(name="ntxent"), lambda: pml_losses.NTXentLoss()),
    "ntxent_t05": (dict(name="ntxent", temperature=0.5), lambda: pml_losses.NTXentLoss(temperature=0.5)),
    "npairs": (dict(name="npairs"), lambda: pml_losses.NPairsLoss()),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_pair_loss_parity(case, dtype):
    params, make_pml = PAIR_CASES[case]
    params = dict(params)
    ours, theirs = build_loss(params.pop("name"), **params), make_pml()
    for seed, (n, k) in enumerate([(32, 4), (30, 3), (20, 2)]):  # several layouts, incl. ragged K
        x, y = embeddings(n, 16, dtype, seed), pk(n, k, seed)
        a, (ga,) = value_and_grad(ours, x, y)
        b, (gb,) = value_and_grad(theirs, x, y)
        assert_close(a, b, dtype)
        assert_close(ga, gb, dtype)


C, D = 12, 16
CLS_CASES = {
    "arcface": (dict(name="arcface", margin=0.5, scale=64.0),
                lambda: pml_losses.ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=64)),
    "arcface_paddle": (dict(name="arcface", margin=0.15, scale=80.0),
                       lambda: pml_losses.ArcFaceLoss(C, D, margin=math.degrees(0.15), scale=80)),
    "arcface_wide_margin": (dict(name="arcface", margin=1.3, scale=4.0),  # exercises the theta > pi - m branch
                            lambda: pml_losses.ArcFaceLoss(C, D, margin=math.degrees(1.3), scale=4)),
    "subcenter_arcface": (dict(name="subcenter_arcface", margin=0.5, scale=64.0, sub_centers=3),
                          lambda: pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D,
                                                                  margin=math.degrees(0.5), scale=64, sub_centers=3)),
    "cosface": (dict(name="cosface", margin=0.35, scale=64.0), lambda: pml_losses.CosFaceLoss(C, D)),
    "normalized_softmax": (dict(name="normalized_softmax", temperature=0.05),
                           lambda: pml_losses.NormalizedSoftmaxLoss(C, D, temperature=0.05)),
    "proxy_anchor": (dict(name="proxy_anchor", margin=0.1, alpha=32.0),
                     lambda: pml_losses.ProxyAnchorLoss(C, D, margin=0.1, alpha=32)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CLS_CASES))
def test_classification_loss_parity(case, dtype):
    params, make_pml = CLS_CASES[case]
    params = dict(params)
    torch.manual_seed(0)
    ours = build_loss(params.pop("name"), num_classes=C, embedding_dim=D, **params).to(dtype)
    theirs = make_pml().to(dtype)
    pml_param = theirs.proxies if case == "proxy_anchor" else theirs.W
    with torch.no_grad():
        pml_param.copy_(ours.weight if case == "proxy_anchor" else ours.weight.T)
    g = torch.Generator().manual_seed(1)
    y = torch.cat([torch.arange(8) % 5, torch.randint(0, C, (16,), generator=g)])  # repeats and absent classes
    x = embeddings(24, D, dtype)
    if case == "arcface_wide_margin":  # push some samples beyond theta > pi - m of their class
        with torch.no_grad():
            x[:6] = -ours.weight[y[:6]].to(dtype) + 0.3 * x[:6]
    a, (ga, gwa) = value_and_grad(ours, x, y, [ours.weight])
    b, (gb, gwb) = value_and_grad(theirs, x, y, [pml_param])
    gwb = gwb if case == "proxy_anchor" else gwb.T
    assert_close(a, b, dtype)
    assert_close(ga, gb, dtype)
    assert_close(gwa, gwb, dtype)


def test_arcface_paddle_form_equals_pml_fallback_everywhere():
    # Paddle: phi = cos(t+m) if cos > cos(pi-m) else cos - sin(pi-m) m; PML: cos(t+m) if t <= pi-m else cos - m sin m
    from deepmetric.losses.classification import arc_margin

    m = 0.9
    cos = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    theta = torch.acos(cos)
    pml = torch.where(theta <= math.pi - m, torch.cos(theta + m), cos - m * math.sin(m))
    torch.testing.assert_close(arc_margin(cos, m, easy_margin=False), pml, rtol=0, atol=2e-6)
    assert math.isclose(math.sin(math.pi - m) * m, math.sin(m) * m)


XBM_CASES = {
    "contrastive": (dict(name="contrastive"), lambda: pml_losses.ContrastiveLoss()),
    "triplet": (dict(name="triplet", margin=0.1), lambda: pml_losses.TripletMarginLoss(margin=0.1)),
    "multi_similarity": (dict(name="multi_similarity"), lambda: pml_losses.MultiSimilarityLoss()),
    "supcon": (dict(name="supcon"), lambda: pml_losses.SupConLoss()),
    "ntxent": (dict(name="ntxent"), lambda: pml_losses.NTXentLoss()),
    "circle": (dict(name="circle"), lambda: pml_losses.CircleLoss()),
    # the mined form keeps its pairs as lists against the memory (pairwise.MultiSimilarityLoss)
    "multi_similarity_mined": (dict(name="multi_similarity", miner_epsilon=0.1), lambda: pml_losses.MultiSimilarityLoss(),
                               lambda: pml_miners.MultiSimilarityMiner(0.1)),
}


@pytest.mark.parametrize("case", list(XBM_CASES))
def test_cross_batch_memory_term_matches_pml(case):
    params, make_pml, *make_miner = XBM_CASES[case]
    params = dict(params)
    ours = CrossBatchMemory(build_loss(params.pop("name"), **params), embedding_dim=D, size=20)
    miner = make_miner[0]() if make_miner else None
    theirs = pml_losses.CrossBatchMemory(make_pml(), embedding_size=D, memory_size=20, miner=miner)
    for step in range(5):  # batches of 8 in a memory of 20: wraps at the third step
        g = torch.Generator().manual_seed(step)
        y = torch.randint(0, 4, (8,), generator=g)
        x = torch.randn(8, D, generator=g)
        xa = x.clone().requires_grad_(True)
        _, mem = ours.terms(xa, y)
        (ga,) = torch.autograd.grad(mem, xa)
        b, (gb,) = value_and_grad(theirs, x, y)
        assert_close(mem, b, torch.float32)
        assert_close(ga, gb, torch.float32)
    torch.testing.assert_close(ours.memory, theirs.embedding_memory)
    assert ours.memory_labels.tolist() == theirs.label_memory.tolist()
    assert int(ours.ptr) == theirs.queue_idx


@pytest.mark.parametrize("name,make_pml", [
    ("supcon", lambda: pml_losses.SupConLoss()),
    ("triplet", lambda: pml_losses.TripletMarginLoss()),
    ("ntxent", lambda: pml_losses.NTXentLoss()),
])
def test_no_positive_pair_gives_zero_like_pml(name, make_pml):
    x, y = embeddings(8, 4, torch.float32), torch.arange(8)
    with pytest.warns(UserWarning):
        a, (ga,) = value_and_grad(build_loss(name), x, y)
    b, (gb,) = value_and_grad(make_pml(), x, y)
    assert a.item() == b.item() == 0.0
    torch.testing.assert_close(ga, gb)
