"""The documented multi-process command, for real: `torchrun -m deepmetric train`, then `--resume`, on gloo,
then `torchrun -m deepmetric eval` of that run against one process: one run, three tests (one torchrun each).

The recipe is the quickstart's on scikit-learn's digits (5 classes train, 2 validate, 3 are the test) with
a tiny model: what is checked is the launch (one writer, one summary, resume, sharded evaluation), not
learning (tests/engine/test_trainer_ddp.py checks that 2 processes equal 1, step by step). On the glyphs
each process spent most of its time rendering the characters and embedding 3808 test images.
"""
import json
import os
import subprocess
import sys

import pytest

from deepmetric.cli import main
from deepmetric.engine.checkpoint import read_checkpoint
from tests.conftest import TINY

RECIPE = [*TINY, "data.train_classes=[0,1,2,3,4,5,6]", "data.val_classes=[5,6]",  # 5 train, 2 validate
          "data.classes_per_batch=4", "data.samples_per_class=2"]


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "deepmetric", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, process): a run trained for 2 steps under torchrun, in ``folder/runs/ddp``."""
    cwd = tmp_path_factory.mktemp("torchrun")
    return cwd, _torchrun("train", "quickstart", "train.max_steps=2", *RECIPE, "--run-dir", "runs/ddp", cwd=cwd)


@pytest.fixture(scope="module")
def resumed(trained):
    """(folder, process): that run resumed to 4 steps under torchrun."""
    cwd, first = trained
    assert first.returncode == 0, "the first torchrun failed: see test_torchrun_train"
    return cwd, _torchrun("train", "--resume", "runs/ddp", "train.max_steps=4", cwd=cwd)


def test_torchrun_train(trained):
    _, first = trained
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("quickstart:") == 1, "rank 0 alone prints the summary"
    assert first.stdout.count("step 2 of 2") == 1


def test_torchrun_resume(resumed):
    cwd, second = resumed
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("quickstart:") == 1 and second.stdout.count(" of 4 ") == 1
    assert "(2 evaluations)" in second.stdout, "the resumed run selects among both validations"
    assert (second.stdout + second.stderr).count("resumed ") == 1, "one rank reports the resume"
    run = cwd / "runs" / "ddp"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4], "one writer, no duplicated lines"
    state = read_checkpoint(run, "last")[1]
    assert state["step"] == 4 and (run / "report.html").is_file()


def test_torchrun_eval_equals_one_process(resumed, capsys, monkeypatch):
    """Evaluation under torchrun: sharded embedding, metrics once, written by rank 0, same as one process."""
    cwd, second = resumed
    assert second.returncode == 0, "the resumed torchrun failed: see test_torchrun_resume"
    ddp = _torchrun("eval", "runs/ddp", "--output", "eval_ddp", cwd=cwd)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("wrote ") == 1
    # one process: the same command, run in this one (PyTorch is loaded here already)
    monkeypatch.chdir(cwd)
    assert main(["eval", "runs/ddp", "--output", "eval_one"]) == 0
    assert capsys.readouterr().out.count("wrote ") == 1
    assert (json.loads((cwd / "eval_ddp" / "metrics.json").read_text())
            == json.loads((cwd / "eval_one" / "metrics.json").read_text()))
