"""deepmetric.core.distributed: one-process behaviour, and 2 gloo processes on 127.0.0.1.

The two-process checks run once (one ``mp.spawn`` for the module) and each is reported as its own
test. Every check does all its collectives before it asserts, so a failure on one rank cannot
leave the other waiting.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from deepmetric.core import distributed as D
from tests.spawned import report, spawn_and_collect

WORLD = 2


# ----------------------------------------------------------------------------- a pair loss
def pair_terms(q, q_labels, q_rows, ref, ref_labels):
    """Smooth contrastive-style terms of queries vs references, and the valid-pair mask.

    ``q_rows`` are the queries' rows in ``ref`` (self pairs are excluded by that explicit rule).
    """
    s = F.normalize(q, dim=1) @ F.normalize(ref, dim=1).T
    same = q_labels[:, None] == ref_labels[None, :]
    terms = torch.where(same, F.softplus(-4.0 * (s - 0.5)), F.softplus(4.0 * (s - 0.1)))
    valid = q_rows[:, None] != torch.arange(ref.shape[0])[None, :]
    return terms, valid


def rank_offsets(local_size: int) -> List[int]:
    """Start row of every rank's block in an all-gather, plus the total (collective)."""
    out = [0]
    for size in D.all_gather_object(int(local_size)):
        out.append(out[-1] + size)
    return out


def make_data(n: int = 8, d_in: int = 6):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 2, 3, 3][:n] + [0] * max(0, n - 8), dtype=torch.int64)
    return x, y


def make_model(d_in: int = 6, d_out: int = 4) -> torch.nn.Module:
    torch.manual_seed(99)
    return torch.nn.Linear(d_in, d_out).double()


def single_process_grads(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> List[torch.Tensor]:
    x, y = make_data()
    model = make_model()
    loss_fn(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def ddp_grads(
    sizes: List[int], loss_fn: Callable[..., torch.Tensor]
) -> List[torch.Tensor]:
    """Rank ``r`` embeds rows ``offsets[r]:offsets[r+1]`` under DDP and calls ``loss_fn``."""
    x, y = make_data()
    rank = dist.get_rank()
    start = sum(sizes[:rank])
    own = slice(start, start + sizes[rank])
    model = DDP(make_model())
    emb = model(x[own])
    loss = loss_fn(emb, y[own])
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- checks (run on both ranks)
def check_init_info(info: D.DistInfo) -> None:
    rank = int(os.environ["RANK"])
    assert info == D.DistInfo(rank=rank, world_size=WORLD, local_rank=rank)
    assert info.is_main == (rank == 0) == D.is_main_process()
    assert D.get_world_size() == WORLD and D.dist_info() == info
    assert D.init_distributed() == info  # second call: no new group


def check_gather_values_unequal(info: D.DistInfo) -> None:
    local = torch.full((info.rank + 1, 2, 3), float(info.rank), requires_grad=True)
    out = D.all_gather_with_grad(local)
    out.sum().backward()
    plain = D.all_gather_with_grad(torch.arange(info.rank + 2))  # no grad: plain gather
    assert out.shape == (3, 2, 3)
    assert torch.equal(out[:1], torch.zeros(1, 2, 3)) and torch.equal(out[1:], torch.ones(2, 2, 3))
    # d(sum over ranks of out.sum()) / d local = W
    assert torch.equal(local.grad, torch.full_like(local, float(WORLD)))
    assert torch.equal(plain, torch.tensor([0, 1, 0, 1, 2]))


def check_pair_loss_sum_scaling(info: D.DistInfo) -> None:
    """Sum reduction: L_r = W * (sum of own queries' terms) reproduces one process; no W is 1/W off."""

    def single(emb, y):
        terms, valid = pair_terms(emb, y, torch.arange(len(y)), emb, y)
        return terms[valid].sum()

    def per_rank(scale):
        def fn(emb, y):
            ref, ref_y = D.all_gather_with_grad(emb, same_size=True), D.all_gather_with_grad(y, same_size=True)
            start = rank_offsets(len(y))[info.rank]
            terms, valid = pair_terms(emb, y, start + torch.arange(len(y)), ref, ref_y)
            return scale * terms[valid].sum()

        return fn

    want = single_process_grads(single)
    got = ddp_grads([4, 4], per_rank(float(WORLD)))
    unscaled = ddp_grads([4, 4], per_rank(1.0))
    for g, w, u in zip(got, want, unscaled):
        torch.testing.assert_close(g, w)
        torch.testing.assert_close(u * WORLD, w)


def check_pair_loss_mean_over_queries(info: D.DistInfo) -> None:
    """Mean over queries, equal local batches: L_r = mean over own queries, no factor."""

    def per_query(q, qy, rows, ref, ref_y):
        terms, valid = pair_terms(q, qy, rows, ref, ref_y)
        return (terms * valid).sum(1) / valid.sum(1)

    def single(emb, y):
        return per_query(emb, y, torch.arange(len(y)), emb, y).mean()

    def per_rank(emb, y):
        ref, ref_y = D.all_gather_with_grad(emb), D.all_gather_with_grad(y)
        start = info.rank * len(y)
        return per_query(emb, y, start + torch.arange(len(y)), ref, ref_y).mean()

    for g, w in zip(ddp_grads([4, 4], per_rank), single_process_grads(single)):
        torch.testing.assert_close(g, w)


def check_pair_loss_mean_over_pairs_unequal(info: D.DistInfo) -> None:
    """Mean over valid pairs, unequal batches (3 + 5): L_r = W * own sum / all-reduced count.

    Queries are taken from the gathered tensor here (the slice at the rank's offset), which must
    give the same gradient as taking them from the local tensor.
    """

    def single(emb, y):
        terms, valid = pair_terms(emb, y, torch.arange(len(y)), emb, y)
        return terms[valid].mean()

    def per_rank(emb, y):
        ref, ref_y = D.all_gather_with_grad(emb), D.all_gather_with_grad(y)
        offsets = rank_offsets(len(y))
        own = slice(offsets[info.rank], offsets[info.rank + 1])
        terms, valid = pair_terms(ref[own], ref_y[own], torch.arange(own.start, own.stop), ref, ref_y)
        count = valid.sum().to(torch.float64)
        dist.all_reduce(count)
        return WORLD * terms[valid].sum() / count

    for g, w in zip(ddp_grads([3, 5], per_rank), single_process_grads(single)):
        torch.testing.assert_close(g, w)


def check_gather_embeddings_order(info: D.DistInfo) -> None:
    """11 items dealt round-robin (rank 0: 6, rank 1: 5), and padded like DistributedSampler."""
    n = 11

    def features(idx):
        return torch.stack([idx.double(), idx.double() ** 2], dim=1), torch.stack([idx % 3, idx], dim=1)

    idx = torch.arange(info.rank, n, WORLD)
    emb, lab = features(idx)
    got_emb, got_lab = D.gather_embeddings(emb, lab, indices=idx)
    rank_order_emb, _ = D.gather_embeddings(emb, lab)
    padded = torch.cat([idx, idx[:1]]) if info.rank == 1 else idx  # 6 + 6, index 1 repeated
    p_emb, p_lab = features(padded)
    pad_emb, pad_lab = D.gather_embeddings(p_emb, p_lab, indices=padded)
    want_emb, want_lab = features(torch.arange(n))
    assert torch.equal(got_emb, want_emb) and torch.equal(got_lab, want_lab)
    assert torch.equal(pad_emb, want_emb) and torch.equal(pad_lab, want_lab)
    want_rank_order, _ = features(torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)]))
    assert torch.equal(rank_order_emb, want_rank_order)


def check_objects(info: D.DistInfo) -> None:
    objs = D.all_gather_object({"rank": info.rank})
    got = D.broadcast_object(f"from {info.rank}", src=0)
    D.barrier()
    assert objs == [{"rank": 0}, {"rank": 1}]
    assert got == "from 0"


CHECKS: Dict[str, Callable[[D.DistInfo], None]] = {
    f.__name__: f
    for f in (
        check_init_info,
        check_gather_values_unequal,
        check_pair_loss_sum_scaling,
        check_pair_loss_mean_over_queries,
        check_pair_loss_mean_over_pairs_unequal,
        check_gather_embeddings_order,
        check_objects,
    )
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = D.init_distributed(backend="gloo", timeout_s=60)
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn(info)
            results[name] = "ok"
        except Exception:  # report per check; the other checks still run
            results[name] = traceback.format_exc()
    report(out_dir, rank, results)  # before leaving the group: see tests.spawned
    D.leave_process_group()  # barrier first: a rank that takes the group down while the other works can abort


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return spawn_and_collect(_worker, (_free_port(), str(out)), out, WORLD)


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks(two_rank_results, name):
    for rank, results in enumerate(two_rank_results):
        assert results[name] == "ok", f"rank {rank}:\n{results[name]}"


def _store_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # no torchrun agent: rank 0 hosts the store
    got = [D.gather_to_main({"rank": rank, "n": 10 * rank}, "first", 60),
           D.gather_to_main(f"second of {rank}", "second", 60)]
    assert not D.is_dist_initialized()
    with open(os.path.join(out_dir, f"store{rank}.pkl"), "wb") as f:
        pickle.dump(got, f)


def test_gather_to_main_through_the_store_alone(tmp_path):
    """The embed shards' end: every rank's object on rank 0 in rank order, two gathers kept apart by
    name, and no process group joined."""
    mp.spawn(_store_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    main, other = (pickle.loads((tmp_path / f"store{r}.pkl").read_bytes()) for r in range(WORLD))
    assert main == [[{"rank": 0, "n": 0}, {"rank": 1, "n": 10}], ["second of 0", "second of 1"]]
    assert other == [None, None]


# ----------------------------------------------------------------------------- one process
def test_not_launched_is_rank0_of_1(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed()
    assert info == D.DistInfo(0, 1, 0) and info.is_main and not info.is_distributed
    assert not D.is_dist_initialized() and D.is_main_process()
    D.barrier()


def test_single_process_helpers_are_identities(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    x = torch.randn(4, 3, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    assert D.all_gather_object("a") == ["a"]
    assert D.gather_to_main("a", "one", 1.0) == ["a"]
    assert D.broadcast_object({"k": 1}) == {"k": 1}
    idx = torch.tensor([3, 1, 2, 1])
    emb, lab = D.gather_embeddings(x, idx * 10, indices=idx)
    assert torch.equal(lab, torch.tensor([10, 20, 30]))
    torch.testing.assert_close(emb, x.detach()[[1, 2, 0]])
    assert not emb.requires_grad


def test_gather_embeddings_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 embeddings but 2 labels"):
        D.gather_embeddings(torch.zeros(3, 2), torch.zeros(2))
