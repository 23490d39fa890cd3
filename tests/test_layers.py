"""The house has one direction of flow (docs/architecture.md): every import, function-local and lazy ones
included, points down the layers of ``tools/import_graph.py``, and no module or layer imports itself
round a loop."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_imports_point_down_with_no_cycle():
    graph = _tool()
    cycles, upward, private = graph.check()
    assert cycles == [], f"import cycles: {cycles}"
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(
        f"  {e.source} -> {e.target} (line {e.line}, {e.kind})" for e in upward)
    assert private == [], f"private names imported from another package: {private}"


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """A lazy import inside a function and a module named in a string both count as edges."""
    graph = _tool()
    pkg = tmp_path / "deepmetric"
    (pkg / "core").mkdir(parents=True)
    (pkg / "engine").mkdir()
    for init in (pkg / "__init__.py", pkg / "core" / "__init__.py", pkg / "engine" / "__init__.py"):
        init.write_text("")
    (pkg / "engine" / "run.py").write_text("X = 1\n")
    (pkg / "core" / "low.py").write_text("def f():\n    from ..engine import run\n\nT = {'a': 'deepmetric.engine.run:X'}\n")
    modules = graph.find_modules(tmp_path)
    edges = graph.import_edges(modules)
    assert {(e.source, e.target, e.kind) for e in edges} == {
        ("deepmetric.core.low", "deepmetric.engine.run", "local"), ("deepmetric.core.low", "deepmetric.engine.run", "string")}
    assert len(graph.violations(edges)) == 2


def test_the_tool_runs_from_the_command_line():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "violations: 0" in r.stdout and "cycles between layers: 0" in r.stdout
