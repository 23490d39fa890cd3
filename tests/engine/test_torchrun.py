"""The documented multi-process command, for real: `torchrun -m deepmetric train`, then `--resume`, on gloo."""
import json
import os
import subprocess
import sys

from deepmetric.engine.checkpoint import read_checkpoint


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "deepmetric", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_train_and_resume(tmp_path):
    common = ["train.progress=false", "train.log_every=1", "model.embedding_dim=16",
              "model.backbone_options={width: 16}", "data.classes_per_batch=4", "data.samples_per_class=2"]
    first = _torchrun("quickstart", "train.max_steps=2", *common, "--run-dir", "runs/ddp", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("quickstart:") == 1, "rank 0 alone prints the summary"
    assert first.stdout.count("step 2 of 2") == 1
    second = _torchrun("--resume", "runs/ddp", "train.max_steps=4", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("quickstart:") == 1 and second.stdout.count(" of 4 ") == 1
    assert (second.stdout + second.stderr).count("resumed ") == 1, "one rank reports the resume"
    run = tmp_path / "runs" / "ddp"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4], "one writer, no duplicated lines"
    state = read_checkpoint(run, "last")[1]
    assert state["step"] == 4 and (run / "report.html").is_file()
    # evaluation under torchrun: sharded embedding, metrics once, written by rank 0, same as one process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "deepmetric", "eval", "runs/ddp", "--output", "eval_ddp"]
    ddp = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("wrote ") == 1
    one = subprocess.run([sys.executable, "-m", "deepmetric", "eval", "runs/ddp", "--output", "eval_one"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert (json.loads((tmp_path / "eval_ddp" / "metrics.json").read_text())
            == json.loads((tmp_path / "eval_one" / "metrics.json").read_text()))
