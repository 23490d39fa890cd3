"""CrossBatchMemory: ring buffer, step counting, warm-up, checkpoints, self exclusion."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from deepmetric.losses import LOSSES, CrossBatchMemory, NoValidPairsWarning, build_loss


def batch(step: int, n: int = 8, d: int = 6):
    g = torch.Generator().manual_seed(step)
    y = torch.arange(n) // 2 + 3 * step  # labels recur across steps
    return torch.randn(n, d, generator=g, requires_grad=True), y


def test_ring_wraps_and_counts():
    xbm = CrossBatchMemory(build_loss("contrastive"), embedding_dim=6, size=10)
    seen = []
    for step in range(3):
        x, y = batch(step, n=4)
        xbm(x, y)
        seen.append((x.detach(), y))
    assert int(xbm.step) == 3 and int(xbm.ptr) == 2 and int(xbm.filled) == 10
    # slots 8, 9 then 0, 1 hold the third batch
    torch.testing.assert_close(xbm.memory[[8, 9, 0, 1]], seen[2][0])
    assert xbm.memory_labels[[8, 9, 0, 1]].tolist() == seen[2][1].tolist()
    torch.testing.assert_close(xbm.memory[4:8], seen[1][0])


def test_start_step_and_eval_mode():
    inner = build_loss("contrastive")
    xbm = CrossBatchMemory(inner, embedding_dim=6, size=32, start_step=2, weight=0.5)
    for step in range(1, 4):
        x, y = batch(step)
        in_batch, mem = xbm.terms(x, y)
        assert (mem is None) == (step <= 2)
        assert int(xbm.filled) == (0 if step <= 2 else 8)
    x, y = batch(9)
    xbm.eval()
    state = {k: v.clone() for k, v in xbm.state_dict().items()}
    torch.testing.assert_close(xbm(x, y), inner(x, y))  # eval: in-batch only, state untouched
    for k, v in xbm.state_dict().items():
        torch.testing.assert_close(v, state[k])
    xbm.train()
    twin = copy.deepcopy(xbm)
    in_batch, mem = twin.terms(x, y)
    torch.testing.assert_close(xbm(x, y), in_batch + 0.5 * mem)


def test_memory_of_only_this_batch_equals_in_batch_loss():
    # own copies are excluded, the rest of the batch is there (detached): same value
    for name in ["contrastive", "triplet", "supcon", "multi_similarity", "circle", "ntxent"]:
        xbm = CrossBatchMemory(build_loss(name), embedding_dim=6, size=64)
        x, y = batch(0)
        in_batch, mem = xbm.terms(x, y)
        torch.testing.assert_close(mem, in_batch, msg=name)


def test_state_dict_restores_exactly():
    a = CrossBatchMemory(build_loss("triplet"), embedding_dim=6, size=12)
    for step in range(4):
        a(*batch(step))
    b = CrossBatchMemory(build_loss("triplet"), embedding_dim=6, size=12)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"memory", "memory_labels", "ptr", "filled", "step"}
    x, y = batch(7)
    torch.testing.assert_close(a(x, y), b(x, y))
    assert int(a.step) == int(b.step) == 5 and int(a.ptr) == int(b.ptr)


def test_gradient_reaches_queries_only():
    xbm = CrossBatchMemory(build_loss("contrastive"), embedding_dim=6, size=64)
    xbm(*batch(0))
    x, y = batch(1)
    xbm(x, y).backward()
    assert x.grad is not None and not xbm.memory.requires_grad


@pytest.mark.parametrize("name", sorted(n for n in LOSSES.names() if LOSSES.get(n).kind == "pair"))
def test_wraps_every_pair_loss(name):
    xbm = CrossBatchMemory(build_loss(name), embedding_dim=6, size=20)
    for step in range(4):  # wraps at the third step
        x, y = batch(step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoValidPairsWarning)
            value = xbm(x, y)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_refuses_classification_losses_and_bad_sizes():
    with pytest.raises(TypeError, match="one pair loss"):
        CrossBatchMemory(build_loss("arcface", num_classes=3, embedding_dim=6), embedding_dim=6, size=8)
    inner = CrossBatchMemory(build_loss("contrastive"), embedding_dim=6, size=8)
    with pytest.raises(TypeError, match="cannot wrap another memory"):
        CrossBatchMemory(inner, embedding_dim=6, size=8)
    xbm = CrossBatchMemory(build_loss("contrastive"), embedding_dim=6, size=4)
    with pytest.raises(ValueError, match="does not fit"):
        xbm(*batch(0))
    with pytest.raises(ValueError, match="embedding_dim=6"):
        xbm(torch.randn(2, 5), torch.arange(2))
