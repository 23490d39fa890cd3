"""Ctrl-C or SIGTERM mid-run: the step in flight finishes, `last` is saved, and --resume continues exactly.

The recipe is the quickstart's on scikit-learn's digits with a tiny model (conftest's TINY): a run
starts in seconds instead of rendering the glyphs and embedding their 3808 test images first. Its
learning rate (the recipe's warm-up, then x0.95 a step) changes at every step and depends on the step
alone, not on ``train.max_steps``, which differs between the interrupted run and the reference: resume
must restore the step, and stays exact however many steps finish before the signal (a tiny step is fast).
"""
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.engine.runs import trainer_for

from tests.conftest import TINY

SMALL = [*TINY, "train.eval_every=0", "model.backbone_options={width: 16, grid: 2}",
         "scheduler.name=step", "scheduler.step_size=1", "scheduler.gamma=0.95"]


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "deepmetric", *args], env


def _steps_logged(run):
    f = run / "metrics.jsonl"
    return sum('"loss"' in line for line in f.read_text().splitlines()) if f.exists() else 0


def _interrupt(run, sig):
    """Start a long run, signal it once three steps are logged; (return code, stderr)."""
    cmd, env = _cli("train", "quickstart", "train.max_steps=100000", *SMALL, "--run-dir", str(run))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while _steps_logged(run) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ctrl_c_saves_last_and_resume_is_exact(tmp_path):
    run = tmp_path / "run"
    code, err = _interrupt(run, signal.SIGINT)
    assert code == 130, err
    assert "saved" in err and "--resume" in err and "Traceback" not in err
    n = read_checkpoint(run, "last")[1]["step"]
    assert n >= 3 and _steps_logged(run) == n, "every finished step is in the checkpoint and the log"

    resume, env = _cli("train", "--resume", str(run), f"train.max_steps={n + 2}")
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # the reference: the same recipe trained straight to n + 2 steps, by the function `deepmetric train`
    # calls, in this process (one thread, as the OMP_NUM_THREADS=1 subprocesses)
    trainer_for("quickstart", [f"train.max_steps={n + 2}", *SMALL], str(tmp_path / "ref")).fit()
    a = load_file(str(read_checkpoint(run, "last")[0] / "model.safetensors"))
    b = load_file(str(read_checkpoint(tmp_path / "ref", "last")[0] / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _steps_logged(run) == n + 2


def test_sigterm_from_a_scheduler_saves_last(tmp_path):
    code, err = _interrupt(tmp_path / "run", signal.SIGTERM)
    assert code == 130 and "SIGTERM received" in err, err
    assert read_checkpoint(tmp_path / "run", "last")[1]["step"] == _steps_logged(tmp_path / "run") >= 3


def test_handlers_are_restored_after_training(tmp_path, tiny_overrides):
    from deepmetric.config import load_config
    from deepmetric.engine.trainer import Trainer
    from deepmetric.quickstart import RECIPE

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    Trainer(load_config(RECIPE, [*tiny_overrides, "train.max_steps=1"]), tmp_path / "r").fit()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
