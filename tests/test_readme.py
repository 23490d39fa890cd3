"""The README's code runs, in document order, in one fresh folder, as a user pasting it would.

- ```python blocks are executed;
- in ```bash blocks, `deepmetric ...` and `python ...` lines are run (backslash continuations
  joined). Training commands get `train.max_steps=2 train.eval_every=2` appended (a later override
  wins), so the suite stays fast; the commands are otherwise exactly as printed.
- Not run: `make ...` (what CI itself runs), `deepmetric serve` and `curl` (a long-running server:
  tests/serve covers it, with a real browser). Fashion-MNIST lines need Debian's
  dataset-fashion-mnist (.ci/run installs it): without it the rest runs and the test is then skipped
  with that reason, or fails under CI=true.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHORT = ["train.max_steps=2", "train.eval_every=2", "train.progress=false"]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def steps():
    """(kind, text) in document order: kind is 'python' or 'shell'."""
    out = []
    for lang, code in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S):
        if lang == "python":
            out.append(("python", code))
        elif lang == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith(("deepmetric ", "python ")):
                    out.append(("shell", line))
    return out


def test_readme_has_code():
    kinds = {k for k, _ in steps()}
    assert kinds == {"python", "shell"}


@pytest.mark.timeout(900)
def test_readme_runs_in_order(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", PYTHONWARNINGS="ignore")
    missing_data = []
    for kind, text in steps():
        if kind == "python":
            exec(compile(text, "README.md", "exec"), {"__name__": "__readme__"})
            continue
        args = shlex.split(text)
        if args[0] == "deepmetric" and args[1] in ("serve",):
            continue
        if "fashion_mnist" in text or "fmnist" in text:
            if not FMNIST.is_dir():
                missing_data.append(text)
                continue
            if args[1] == "train":
                args += ["data.options.train_limit=2000", "data.options.test_limit=500"]
        if args[0] == "deepmetric" and args[1] in ("train", "quickstart"):
            args += SHORT
        if args[0] == "python":
            args[0] = sys.executable
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{text}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    if missing_data:
        require(False, f"{FMNIST} is absent (apt-get install dataset-fashion-mnist): {len(missing_data)} "
                       f"README command(s) not run, the first: {missing_data[0]}")
