"""Multi-process training (gloo, 2 CPU processes) equals one process on the same global batches.

One recipe carries a pair loss (batch-hard triplet), a classification loss (ArcFace) and a
cross-batch memory (contrastive), so one spawn checks all three. The backbone uses GroupNorm:
BatchNorm statistics are per process by nature (SyncBatchNorm needs GPUs).
"""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from deepmetric.config import load_config
from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.quickstart import RECIPE

STEPS = 4
OVERRIDES = [
    "data.format=digits", "data.options={}", "data.train_classes=[0,1,2,3,4]", "data.val_classes=null",
    "eval.metric=recall@1", "data.classes_per_batch=2", "data.samples_per_class=4", "model.embedding_dim=16",
    "model.backbone_options={width: 16, norm: group}", "train.progress=false", "train.log_every=1",
    f"train.max_steps={STEPS}", "train.eval_every=2", "optimizer.name=sgd", "optimizer.lr=0.05",
    "scheduler.name=constant", "scheduler.warmup_steps=0",
    "losses=[{name: triplet, params: {mining: hard, margin: 0.2}}, {name: arcface, weight: 0.5, params: {scale: 16.0, margin: 0.2}},"
    " {name: contrastive, params: {neg_margin: 1.0}, memory: {size: 40, start_step: 1}}]",
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, run_dir, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from deepmetric.engine.trainer import Trainer

    try:
        Trainer(load_config(RECIPE, overrides), run_dir).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class MergedSampler:
    """One process's view of W ranks: global batch t = concat of the plan's batches t*W .. t*W+W-1."""

    def __init__(self, inner, world):
        self.inner, self.world = inner, world

    def __iter__(self):
        plan = self.inner._plan(self.inner.epoch)
        for t in range(len(plan) // self.world):
            yield np.concatenate(plan[t * self.world:(t + 1) * self.world]).tolist()

    def __len__(self):
        return len(self.inner._plan(self.inner.epoch)) // self.world

    def set_epoch(self, e):
        self.inner.set_epoch(e)

    def skip(self, n):
        assert n == 0

    def state_dict(self):
        return self.inner.state_dict()


@pytest.mark.timeout(300)
def test_ddp_two_processes_equal_one_process(tmp_path, overrides=OVERRIDES):
    from torch.utils.data import DataLoader

    from deepmetric.engine.trainer import Trainer

    ddp_dir = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), str(ddp_dir), list(overrides)), nprocs=2, join=True)

    single = Trainer(load_config(RECIPE, overrides), tmp_path / "single")
    single.sampler = MergedSampler(single.sampler, 2)
    single.loader = DataLoader(single.splits.train, batch_sampler=single.sampler)
    single.fit()

    (a_dir, a_state), (b_dir, b_state) = read_checkpoint(ddp_dir, "last"), read_checkpoint(tmp_path / "single", "last")
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)  # one loss alone: 1e-7
    ta, tb = load_file(str(a_dir / "train_state.safetensors")), load_file(str(b_dir / "train_state.safetensors"))
    for k in tb:
        if k.startswith("losses."):  # classifier weights and the memory queue (same order on every rank)
            torch.testing.assert_close(ta[k].float(), tb[k].float(), rtol=1e-3, atol=1e-4, msg=k)
    assert a_state["step"] == b_state["step"] == STEPS
    # evaluation under DDP (sharded embedding, gathered, metrics once) equals one process on the same weights
    from deepmetric.engine.checkpoint import load_model_weights
    from deepmetric.engine.evaluator import Evaluator

    load_model_weights(single.model, a_dir)
    # the trainer trains in NHWC order on a CPU (train.channels_last: auto) and evaluates in NCHW
    again = Evaluator(single.cfg, single.splits).evaluate(single.model.to(memory_format=torch.contiguous_format))
    for key, value in again.items():
        if isinstance(value, float):
            assert a_state["metrics"][key] == pytest.approx(value, abs=1e-9), key
