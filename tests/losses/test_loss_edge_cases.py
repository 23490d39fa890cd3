"""Edge cases shared by the zoo: batches with nothing to learn from, low precision, huge label ids,
the explicit self-pair rule, and input checks."""
from __future__ import annotations

import warnings

import pytest
import torch

from deepmetric.losses import LOSSES, NoValidPairsWarning, build_loss

PAIR = sorted(n for n in LOSSES.names() if LOSSES.get(n).kind == "pair")
CLASSIFICATION = sorted(n for n in LOSSES.names() if LOSSES.get(n).kind == "classification" and n != "partial_fc")
# losses whose value is a deterministic function of the batch (triplet "random" is the only sampler)
NEED_POSITIVES = {"triplet", "circle", "supcon", "ntxent", "npairs", "quadruplet", "msml", "eml",
                  "centroid_triplet", "ctl", "infonce"}


def pk(n=16, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) // k
    return y[torch.randperm(n, generator=g)]


def x_(n=16, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("name", PAIR)
def test_no_positive_pair(name):
    x, y = x_(), torch.arange(16)  # all singletons
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loss = build_loss(name)(x, y)
        loss.backward()
    assert torch.isfinite(loss)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    warned = any(issubclass(w.category, NoValidPairsWarning) for w in rec)
    if name in NEED_POSITIVES:
        assert warned and loss.item() == 0.0 and x.grad.abs().sum() == 0
    else:  # contrastive, contrastive_xbm, multi_similarity still push negatives apart
        assert not warned


@pytest.mark.parametrize("name", PAIR)
@pytest.mark.parametrize("case", ["one_class", "single_item"])
def test_degenerate_batches_are_finite(name, case):
    x, y = (x_(), torch.zeros(16, dtype=torch.long)) if case == "one_class" else (x_(1), torch.zeros(1, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoValidPairsWarning)
        loss = build_loss(name)(x, y)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_supcon_one_class_computes_the_formula():
    # documented difference from PML (which returns 0): every other item is a positive
    x, y = x_(8), torch.zeros(8, dtype=torch.long)
    s = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T / 0.1
    eye = torch.eye(8, dtype=torch.bool)
    lse = s.masked_fill(eye, float("-inf")).logsumexp(1)
    expected = (lse - s.masked_fill(eye, 0).sum(1) / 7).mean()
    torch.testing.assert_close(build_loss("supcon")(x, y), expected)


@pytest.mark.parametrize("name", sorted(set(PAIR) - {"triplet"}) + ["triplet_all", "triplet_hard"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_close_to_fp32(name, dtype):
    loss = build_loss("triplet", mining=name.split("_")[1]) if name.startswith("triplet_") else build_loss(name)
    x32, y = x_(32, 16), pk(32)
    x16 = x32.detach().to(dtype).requires_grad_(True)
    ref = loss(x16.detach().float(), y)  # same rounded inputs, float32 math
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoValidPairsWarning)
        val = loss(x16, y)
        val.backward()
    assert val.dtype == torch.float32 and x16.grad.dtype == dtype
    assert torch.isfinite(val) and torch.isfinite(x16.grad.float()).all()
    torch.testing.assert_close(val, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["supcon", "circle", "triplet", "arcface", "proxy_anchor"])
def test_autocast_bf16_keeps_full_precision_logits(name):
    kw = {"num_classes": 10, "embedding_dim": 16} if LOSSES.get(name).kind == "classification" else {}
    loss = build_loss(name, **kw)
    x, y = x_(32, 16), (torch.arange(32) % 10 if kw else pk(32))
    ref = loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = loss(x, y)
    assert val.dtype == torch.float32
    torch.testing.assert_close(val, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PAIR)
def test_labels_beyond_float32_range_stay_distinct(name):
    # 2**24 and 2**24 + 1 are the same float32: a loss casting labels would merge the classes
    y_small = pk(16)
    y_big = y_small + 2**24
    assert torch.tensor([2**24, 2**24 + 1]).float().unique().numel() == 1
    loss = build_loss(name)
    x = x_()
    torch.testing.assert_close(loss(x, y_big), loss(x, y_small))


def test_classification_labels_are_int64_end_to_end():
    loss = build_loss("cosface", num_classes=5, embedding_dim=8)
    with pytest.raises(TypeError, match="int64"):
        loss(x_(4), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    loss(x_(4), torch.tensor([0, 1, 2, 3], dtype=torch.int32))  # other integer types are fine


@pytest.mark.parametrize("name", sorted(set(PAIR) - {"centroid_triplet", "ctl"}))
def test_reference_equal_to_batch_with_self_excluded_equals_in_batch(name):
    # the explicit rule: ref_exclude[i] = i on a reference equal to the batch is the in-batch loss
    if name == "triplet":
        loss = build_loss(name, mining="all")
    else:
        loss = build_loss(name)
    x, y = x_(16, 8, dtype=torch.float64), pk(16)
    a = loss(x, y)
    (ga,) = torch.autograd.grad(a, x)
    b = loss(x, y, ref_embeddings=x, ref_labels=y, ref_exclude=torch.arange(16))
    (gb,) = torch.autograd.grad(b, x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_reference_without_exclusion_counts_every_pair():
    # a clone of the batch as reference: self pairs count (similarity 1), unlike PML's identity rule
    loss = build_loss("supcon")
    x, y = x_(8, dtype=torch.float64), pk(8, 2)
    with_self = loss(x, y, ref_embeddings=x.detach().clone(), ref_labels=y.clone())
    assert not torch.allclose(with_self, loss(x, y))


def test_input_checks():
    loss = build_loss("triplet")
    with pytest.raises(ValueError, match="2-D"):
        loss(torch.randn(4), torch.arange(4))
    with pytest.raises(ValueError, match="shape"):
        loss(torch.randn(4, 3), torch.arange(5))
    with pytest.raises(TypeError, match="float labels collide"):
        loss(torch.randn(4, 3), torch.arange(4).float())
    with pytest.raises(ValueError, match="together"):
        loss(torch.randn(4, 3), torch.arange(4), ref_embeddings=torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs ref_embeddings"):
        loss(torch.randn(4, 3), torch.arange(4), ref_exclude=torch.arange(4))
    with pytest.raises(ValueError, match="embedding_dim=8"):
        build_loss("arcface", num_classes=3, embedding_dim=8)(torch.randn(2, 4), torch.arange(2))


@pytest.mark.parametrize("mined", [False, True])
def test_reference_of_one_item_has_pairs_unless_every_query_excludes_it(mined):
    loss = build_loss("multi_similarity", miner_epsilon=0.1 if mined else None)
    x, y = x_(4), torch.tensor([0, 0, 1, 1])
    ref, ref_y = torch.randn(1, 8), torch.tensor([0])
    with pytest.warns(NoValidPairsWarning):
        assert loss(x, y, ref_embeddings=ref, ref_labels=ref_y, ref_exclude=torch.zeros(4, dtype=torch.long)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoValidPairsWarning)
        # one query keeps the pair: a positive with no negative (0 by the formula, but no warning)
        loss(x, y, ref_embeddings=ref, ref_labels=ref_y, ref_exclude=torch.tensor([-1, 0, 0, 0]))
        value = loss(torch.cat([x, x]), torch.cat([y, y + 2]), ref_embeddings=torch.cat([ref, ref]),
                     ref_labels=torch.tensor([0, 1]))
    assert value > 0


def test_mined_multi_similarity_against_a_reference_stays_finite_for_a_query_without_positives():
    # a query whose class is not in the reference keeps no pair; with a low base and a high beta its
    # hardest negative's exponent overflows float32 unless it is kept out of the gradient
    g = torch.Generator().manual_seed(0)
    ref, ref_y = torch.randn(40, 8, generator=g), torch.arange(40) % 4
    x = (ref[:6] + 0.01 * torch.randn(6, 8, generator=g)).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 9, 9])
    loss = build_loss("multi_similarity", miner_epsilon=0.1, base=-1.0, beta=60.0)
    value = loss(x, y, ref_embeddings=ref, ref_labels=ref_y)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert grad[4:].abs().max() == 0 and grad[:4].abs().max() > 0
