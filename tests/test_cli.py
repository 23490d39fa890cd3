"""The command line: exit codes and one-line errors for bad input."""
import subprocess
import sys

import pytest

from deepmetric.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "deepmetric", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["train", "configs/quickstart.yaml", "train.max_step=3"], "unknown config key 'train.max_step'; did you mean 'max_steps'?"),
    (["train", "configs/quickstart.yaml", "train.max_steps=x"], "config key 'train.max_steps': input should be a valid integer"),
    (["train", "nope.yaml"], "config file not found: nope.yaml"),
    (["eval", "runs/does-not-exist", "--checkpoint", "runs/does-not-exist"], "config file not found"),
    (["train", "--resume", "/nonexistent/run"], "/nonexistent/run"),
    (["train", "--resume", "configs"], "--resume configs: not a run directory"),
    (["train", "configs/quickstart.yaml", "train.device=tpu"], "config key 'train.device'"),
    # argparse's own errors: one line too, pointing at the command's --help
    (["list", "nope"], "invalid choice: 'nope'"),
    (["export", "--checkpoint", "x", "--format", "nope", "--output", "y"], "see `deepmetric export --help`"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse exits itself
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    r = run_cli("train", "configs/quickstart.yaml", "data.format=fashion_mnist", "data.options={}", f"data.root={tmp_path}/none",
                "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("deepmetric: error: Fashion-MNIST root") and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_list_shows_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "triplet" in out and "resnet50" in out and "digits" in out and "quickstart" in out


def test_overrides_may_follow_options(tmp_path):
    code = main(["train", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "r"), "train.max_step=3"])
    assert code == 2, "the override after --run-dir is read (and this one is rejected by name)"
    with pytest.raises(SystemExit):
        main(["list", "--bogus"])


def test_cuda_without_a_gpu_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "configs/quickstart.yaml", "train.device=cuda", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1
