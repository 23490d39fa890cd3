"""PartialFC against an independently written full-softmax ArcFace/CosFace head.

One process, and 2 gloo processes (one ``mp.spawn`` for the module; each check reported as a
test). In two processes the backbone is DDP-wrapped and the head sits outside DDP, as a trainer
would use them; the reference is one process training on the concatenated batch.
"""
from __future__ import annotations

import math
import traceback
from typing import Callable, Dict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from deepmetric.core.distributed import all_gather_object, leave_process_group
from deepmetric.losses.partial_fc import PartialFC, shard_classes
from deepmetric.losses import LOSSES
from tests.spawned import report, spawn_and_collect

WORLD = 2


def full_head_loss(x, y, weight, margin_type, scale, margin):
    """Naive full-softmax head: arccos-based ArcFace (with the pi - m fallback) or CosFace."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
    rows = torch.arange(len(y))
    c = cos[rows, y]
    if margin_type == "arcface":
        theta = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
        target = torch.where(theta + margin <= math.pi, torch.cos(theta + margin), c - margin * math.sin(margin))
    else:
        target = c - margin
    one_hot = F.one_hot(y, weight.shape[0]).bool()
    logits = torch.where(one_hot, target[:, None], cos)
    return F.cross_entropy(scale * logits, y)


def make_batch(n, d, num_classes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    w = torch.randn(num_classes, d, generator=g, dtype=dtype)
    return x, y, w


# ----------------------------------------------------------------------------- one process
@pytest.mark.parametrize("margin_type,margin", [("arcface", 0.5), ("cosface", 0.35)])
def test_world1_equals_full_head(margin_type, margin):
    x, y, w = make_batch(12, 8, 9, seed=0)
    # one row pointing away from its centre exercises the arcface theta > pi - m branch
    x[0] = -w[y[0]] + 0.01 * x[0]
    pfc = PartialFC(9, 8, margin_type=margin_type, scale=16.0, margin=margin).double()
    pfc.load_full_weight(w)
    xa = x.clone().requires_grad_()
    loss = pfc(xa, y)
    loss.backward()
    wr, xr = w.clone().requires_grad_(), x.clone().requires_grad_()
    ref = full_head_loss(xr, y, wr, margin_type, 16.0, margin)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(xa.grad, xr.grad)
    torch.testing.assert_close(pfc.weight.grad, wr.grad)
    assert pfc.last_step["logits_shape"] == (12, 9) and pfc.last_step["sampled_classes"] is None


@pytest.mark.parametrize("margin_type,margin", [("arcface", 0.5), ("cosface", 0.35)])
def test_world1_equals_the_zoo_head(margin_type, margin):
    """Same weights as the loss zoo's ``arcface`` / ``cosface``: same value and gradients."""
    import deepmetric.losses  # noqa: F401  (registers the zoo; kept out of the spawned workers)

    x, y, _ = make_batch(16, 8, 10, seed=2)
    x[0] = -x[0]
    zoo = LOSSES.build(margin_type, num_classes=10, embedding_dim=8, scale=30.0, margin=margin).double()
    pfc = PartialFC(10, 8, margin_type=margin_type, scale=30.0, margin=margin).double()
    pfc.load_full_weight(zoo.weight.detach())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = zoo(xa, y), pfc(xb, y)
    (a + b).backward()
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(pfc.weight.grad, zoo.weight.grad)


def test_world1_sampling_keeps_positives_and_matches_subset_head():
    torch.manual_seed(3)
    num_classes = 50
    x, _, w = make_batch(10, 8, num_classes, seed=1)
    y = torch.tensor([3, 3, 7, 12, 12, 31, 44, 7, 0, 49])
    pfc = PartialFC(num_classes, 8, scale=16.0, sample_rate=0.3).double()
    pfc.load_full_weight(w)
    xa = x.clone().requires_grad_()
    loss = pfc(xa, y)
    loss.backward()
    sampled = pfc.last_step["sampled_classes"]
    assert sampled.numel() == int(0.3 * num_classes) == 15
    assert set(y.tolist()) <= set(sampled.tolist())
    assert torch.equal(sampled, sampled.sort().values)
    assert pfc.last_step["logits_shape"] == (10, 15)  # never (10, 50)
    wr, xr = w[sampled].clone().requires_grad_(), x.clone().requires_grad_()
    ref = full_head_loss(xr, torch.searchsorted(sampled, y), wr, "arcface", 16.0, 0.5)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(xa.grad, xr.grad)
    torch.testing.assert_close(pfc.weight.grad[sampled], wr.grad)
    unsampled = torch.ones(num_classes, dtype=torch.bool)
    unsampled[sampled] = False
    assert torch.count_nonzero(pfc.weight.grad[unsampled]) == 0


def test_sampling_with_more_positives_than_budget_keeps_them_all():
    y = torch.arange(10)
    pfc = PartialFC(20, 4, sample_rate=0.1)
    pfc(torch.randn(10, 4), y)
    assert torch.equal(pfc.last_step["sampled_classes"], y)


def test_autocast_input_computes_fp32_logits():
    pfc = PartialFC(6, 4)
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(x, torch.tensor([0, 1, 2, 3, 5]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_inputs_and_registry():
    pfc = LOSSES.build("partial_fc", num_classes=5, embedding_dim=3)
    assert isinstance(pfc, PartialFC) and pfc.kind == "classification"
    assert isinstance(pfc.weight, torch.nn.Parameter) and pfc.weight.shape == (5, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        pfc(torch.randn(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        pfc(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int64"):
        pfc(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="margin_type"):
        PartialFC(5, 3, margin_type="sphereface")


def test_shards_are_contiguous_and_cover_all_classes():
    for c, w in [(7, 2), (10, 3), (4, 4)]:
        blocks = [shard_classes(c, w, r) for r in range(w)]
        assert blocks[0][0] == 0 and sum(n for _, n in blocks) == c
        assert all(s + n == blocks[i + 1][0] for i, (s, n) in enumerate(blocks[:-1]))


# ----------------------------------------------------------------------------- two processes
def _ddp_step(sizes, num_classes, margin_type, margin, sample_rate):
    """Backbone (DDP) + PartialFC on this rank's rows; returns what the checks compare."""
    rank = dist.get_rank()
    inputs, y, w = make_batch(sum(sizes), 6, num_classes, seed=7)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(6, 5).double()
    torch.manual_seed(100 + rank)  # sampling differs per rank, as it does in training
    reference_backbone = torch.nn.Linear(6, 5).double()
    reference_backbone.load_state_dict(backbone.state_dict())
    w = w[:, :5].contiguous()
    start = sum(sizes[:rank])
    own = slice(start, start + sizes[rank])

    model = DDP(backbone)
    pfc = PartialFC(num_classes, 5, margin_type=margin_type, scale=8.0, margin=margin, sample_rate=sample_rate).double()
    pfc.load_full_weight(w)
    loss = pfc(model(inputs[own]), y[own])
    loss.backward()
    sampled = pfc.last_step["sampled_classes"]
    every_sampled = all_gather_object(None if sampled is None else sampled.tolist())

    # one process, whole batch, full head over the classes all ranks sampled
    keep = torch.arange(num_classes) if sampled is None else torch.tensor(sorted(sum(every_sampled, [])))
    wr = w[keep].clone().requires_grad_()
    ref = full_head_loss(reference_backbone(inputs), torch.searchsorted(keep, y), wr, margin_type, 8.0, margin)
    ref.backward()
    full_grad = torch.zeros_like(w)
    full_grad[keep] = wr.grad
    return dict(
        loss=loss, ref=ref, pfc=pfc, y=y, keep=keep,
        backbone_grads=[p.grad for p in model.parameters()],
        ref_backbone_grads=[p.grad for p in reference_backbone.parameters()],
        weight_grad=pfc.weight.grad, ref_weight_grad=full_grad[pfc.shard],
    )


def _assert_matches_reference(r):
    torch.testing.assert_close(r["loss"], r["ref"])
    for g, want in zip(r["backbone_grads"], r["ref_backbone_grads"]):
        torch.testing.assert_close(g, want)
    torch.testing.assert_close(r["weight_grad"], r["ref_weight_grad"])


def check_arcface_sample1_equals_full_head(rank):
    r = _ddp_step([3, 5], 7, "arcface", 0.5, 1.0)  # unequal batches, shards of 4 and 3 classes
    _assert_matches_reference(r)
    assert r["pfc"].num_local == (4, 3)[rank]
    assert r["pfc"].last_step["logits_shape"] == (8, r["pfc"].num_local)  # (B, C_local), never (B, C)


def check_cosface_sample1_equals_full_head(rank):
    _assert_matches_reference(_ddp_step([4, 4], 7, "cosface", 0.35, 1.0))


def check_sampling_keeps_positives(rank):
    r = _ddp_step([4, 4], 40, "arcface", 0.5, 0.4)
    _assert_matches_reference(r)
    pfc = r["pfc"]
    sampled = set(pfc.last_step["sampled_classes"].tolist())
    own_positives = {c for c in r["y"].tolist() if pfc.class_start <= c < pfc.class_start + pfc.num_local}
    assert own_positives <= sampled
    assert len(sampled) == max(int(0.4 * 20), len(own_positives))
    assert all(pfc.class_start <= c < pfc.class_start + pfc.num_local for c in sampled)
    assert pfc.last_step["logits_shape"] == (8, len(sampled))


def check_no_ddp_compensation_gives_partial_derivative(rank):
    """compensate_ddp_average=False hands the embeddings dL/dx exactly (DDP then halves it)."""
    torch.manual_seed(0)
    inputs, y, w = make_batch(6, 4, 5, seed=11)
    x = inputs.clone().requires_grad_()
    pfc = PartialFC(5, 4, scale=8.0, compensate_ddp_average=False).double()
    pfc.load_full_weight(w)
    pfc(x[3 * rank : 3 * rank + 3], y[3 * rank : 3 * rank + 3]).backward()
    xr = inputs.clone().requires_grad_()
    full_head_loss(xr, y, w, "arcface", 8.0, 0.5).backward()
    own = slice(3 * rank, 3 * rank + 3)
    torch.testing.assert_close(x.grad[own], xr.grad[own])


CHECKS: Dict[str, Callable[[int], None]] = {
    f.__name__: f
    for f in (
        check_arcface_sample1_equals_full_head,
        check_cosface_sample1_equals_full_head,
        check_sampling_keeps_positives,
        check_no_ddp_compensation_gives_partial_derivative,
    )
}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn(rank)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    report(out_dir, rank, results)  # before leaving the group: see tests.spawned
    leave_process_group()  # barrier first: a rank that takes the group down while the other works can abort


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("pfc")
    return spawn_and_collect(_worker, (str(out / "init"), str(out)), out, WORLD)


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks(two_rank_results, name):
    for rank, results in enumerate(two_rank_results):
        assert results[name] == "ok", f"rank {rank}:\n{results[name]}"
