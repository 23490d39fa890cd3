"""The documentation: the site builds with ``mkdocs build --strict``, and the code of the README and of
every page of ``docs/`` runs, in document order, in a fresh folder per page, as a reader pasting it would.

- ```python blocks are executed (each in a namespace of its own);
- in ```bash blocks, ``deepmetric ...`` and ``python ...`` lines are run (backslash continuations
  joined), each in a process of its own. Training commands get ``SHORT`` appended (a later override
  wins), so the suite stays fast; the commands are otherwise exactly as printed. ``deepmetric`` lines
  run as the console script runs them, in processes forked from one that has imported PyTorch,
  torchvision and scikit-learn once per page (tests/forked_cli.py): a page of ten commands would
  otherwise spend most of its time starting PyTorch ten times;
- ```text, ```console, ```yaml and unlabelled blocks are not run: output, layouts, and commands that
  need a data set, weights or hardware the suite does not have (the recipes are smoke-tested on
  miniatures of their layouts by ``tests/recipes``);
- in bash blocks, other lines are not run: ``deepmetric serve`` (a long-running server: ``tests/serve``
  covers it, with a real browser), ``curl``, ``export``;
- a page that starts with ``<!-- docs-test: continues PAGE -->`` runs in a copy of PAGE's folder, after
  it, so that it can use what PAGE made (a trained run, an index) without training it again (its test
  comes after PAGE's, so that each test's time is its own page's);
- Fashion-MNIST lines need Debian's ``dataset-fashion-mnist`` (``.ci/run`` installs it): without it
  the rest of the page runs and the test is then skipped with that reason, or fails under ``CI=true``.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import require
from tests.forked_cli import ForkedCLI

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
README_MAX_LINES = 250
SHORT = ["train.max_steps=2", "train.eval_every=2", "train.progress=false", "train.time_budget=null"]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
# folders of the repository a page's commands name by relative path (configs/fashion_mnist.yaml, ...)
LINKED = ("configs", "tools", "benchmarks")
CONTINUES = re.compile(r"<!-- docs-test: continues (\S+) -->")
# modules the API reference does not render yet, and why
NOT_IN_REFERENCE = {
    "deepmetric.__main__": "runs the command line; nothing to document",
}


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def steps(text: str):
    """(kind, code) in document order: kind is 'python' or 'shell'."""
    out = []
    for lang, code in re.findall(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        code = textwrap.dedent(code)
        if lang == "python":
            out.append(("python", code))
        elif lang == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith(("deepmetric ", "python ")):
                    out.append(("shell", line))
    return out


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}: move detail to docs/"


def test_readme_links_resolve():
    """The README is read on the repository's page, outside the site: its links to files must exist."""
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if not re.match(r"[a-z]+:", target):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_pages_have_code():
    kinds = {k for page in PAGES for k, _ in steps(page.read_text())}
    assert kinds == {"python", "shell"}
    assert steps(README.read_text()), "the README's example should run"


def test_continued_pages_exist():
    for page in PAGES:
        for name in CONTINUES.findall(page.read_text()):
            assert (DOCS / name).is_file(), f"{page_id(page)} continues {name}, which is not in docs/"


def test_the_reference_covers_every_module():
    """Every module of the package is rendered by a ``::: name`` line of docs/reference/ (or is listed in
    NOT_IN_REFERENCE with the reason), so a new module cannot be left out of the API reference."""
    rendered = set()
    for page in (DOCS / "reference").glob("*.md"):
        rendered |= set(re.findall(r"^::: (\S+)", page.read_text(), flags=re.M))
    src = ROOT / "src"
    modules = set()
    for path in (src / "deepmetric").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules.add(".".join(parts))
    missing = sorted(modules - rendered - set(NOT_IN_REFERENCE))
    assert not missing, f"not in docs/reference/: {missing}"
    assert not rendered - modules, f"docs/reference/ names modules that do not exist: {sorted(rendered - modules)}"


@pytest.mark.timeout(300)
def test_site_builds_strict(tmp_path):
    """Broken links, anchors, pages missing from the nav and docstrings that do not render all fail."""
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as e:
        require(False, f"the docs extra is not installed (pip install -e '.[docs]'): {e}")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert (tmp_path / "site" / "your-own-images" / "index.html").is_file()


_RAN = {}  # page -> (the folder its code ran in, the lines left out for want of data); None: it failed


def run_page(page: Path, factory, monkeypatch):
    """Run ``page``'s code in a fresh folder (a copy of the folder of the page it continues); return the
    folder and the Fashion-MNIST lines left out because the data set is absent."""
    if page in _RAN:
        assert _RAN[page] is not None, f"{page_id(page)} failed; pages that continue it cannot run"
        return _RAN[page]
    _RAN[page] = None
    text = page.read_text()
    folder = factory.mktemp(page.stem)
    parent = CONTINUES.search(text)
    if parent:
        shutil.copytree(run_page(DOCS / parent.group(1), factory, monkeypatch)[0], folder, symlinks=True,
                        dirs_exist_ok=True)
    else:
        for name in LINKED:
            (folder / name).symlink_to(ROOT / name)
    monkeypatch.chdir(folder)
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", PYTHONWARNINGS="ignore")
    missing_data = []
    cli = None
    try:
        for kind, code in steps(text):
            if kind == "python":
                exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})
                continue
            args = shlex.split(code)
            if args[0] == "deepmetric" and args[1] in ("serve",):
                continue
            if "fashion_mnist" in code or "fmnist" in code:
                if not FMNIST.is_dir():
                    missing_data.append(code)
                    continue
                if args[1] == "train":
                    args += ["data.options.train_limit=2000", "data.options.test_limit=500"]
            if args[0] == "deepmetric" and args[1] in ("train", "quickstart"):
                args += SHORT
            if args[0] == "deepmetric":
                cli = cli or ForkedCLI(env, folder)
                returncode, stdout, stderr = cli.run(args[1:], cwd=folder, timeout=600)
            else:
                if args[0] == "python":
                    args[0] = sys.executable
                r = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
                returncode, stdout, stderr = r.returncode, r.stdout, r.stderr
            assert returncode == 0, f"{page_id(page)}: {code}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    finally:
        if cli is not None:
            cli.close()
    _RAN[page] = folder, missing_data
    return _RAN[page]


def run_order(pages):
    """``pages`` in order, except that a page another continues comes before it."""
    ordered = []

    def add(page):
        parent = CONTINUES.search(page.read_text())
        if parent and DOCS / parent.group(1) in pages:
            add(DOCS / parent.group(1))
        if page not in ordered:
            ordered.append(page)

    for page in pages:
        add(page)
    return ordered


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", run_order([p for p in PAGES if steps(p.read_text())]), ids=page_id)
def test_page_code_runs(page, tmp_path_factory, monkeypatch):
    _, missing_data = run_page(page, tmp_path_factory, monkeypatch)
    if missing_data:
        require(False, f"{FMNIST} is absent (apt-get install dataset-fashion-mnist): {len(missing_data)} "
                       f"command(s) of {page_id(page)} not run, the first: {missing_data[0]}")
