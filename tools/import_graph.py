"""The import graph of ``src/deepmetric`` and its layering, read with ``ast`` (nothing is imported).

    python tools/import_graph.py            # layers, edges between them, cycles, violations
    python tools/import_graph.py --modules  # also every module's imports

Every import counts: module level, inside functions, under ``if TYPE_CHECKING``, and string references
to a module (``importlib.import_module("deepmetric.x")``, lazy tables of ``"deepmetric.x.y:attr"``), so
a lazy import cannot hide an edge. The layers, lowest first (docs/architecture.md explains them), and what each may import:

======================  ============================================================
layer                   may import
======================  ============================================================
core                    nothing of deepmetric
config                  core
data, models, losses,   core (and their own package)
evaluation
engine                  core, config, data, models, losses, evaluation
inference               the above and engine
viz                     core, evaluation
serve                   core, inference
cli                     anything below (cli.py, quickstart.py, __main__.py)
api                     anything (the package ``__init__``: lazy public names)
======================  ============================================================

A violation is an import of a module outside those; a cycle is a set of modules (or of layers) that
import each other, directly or round a loop; a private import takes a ``_name`` from another package. ``tests/test_layers.py`` runs :func:`check` so neither can come back.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "deepmetric"

_COMPONENTS = ("data", "models", "losses", "evaluation")
ALLOWED: Dict[str, Set[str]] = {
    "core": set(),
    "config": {"core"},
    **{c: {"core"} for c in _COMPONENTS},
    "engine": {"core", "config", *_COMPONENTS},
    "inference": {"core", "config", *_COMPONENTS, "engine"},
    "viz": {"core", "evaluation"},
    "serve": {"core", "inference"},
    "cli": {"core", "config", *_COMPONENTS, "engine", "inference", "viz", "serve"},
    "api": {"core", "config", *_COMPONENTS, "engine", "inference", "viz", "serve", "cli"},
}
ORDER = ["core", "config", *_COMPONENTS, "engine", "inference", "viz", "serve", "cli", "api"]
_CLI = {"cli", "quickstart", "__main__"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    kind: str  # "module" (top level), "local" (inside a function or a block), "string" (a module named in a string)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return "cli" if parts[1] in _CLI else parts[1]


def _package(module: str) -> str:
    """``deepmetric.engine.build`` -> ``deepmetric.engine``; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def find_modules(root: Path = ROOT) -> Dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The module ``name`` lives in (``deepmetric.a.b.attr`` -> ``deepmetric.a.b``), or None if not ours."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: Dict[str, Path]) -> None:
        self.module, self.is_package, self.modules = module, is_package, modules
        self.depth = 0
        self.edges: List[Edge] = []
        self.private: List[Edge] = []  # a _private name imported from another package

    def _add(self, name: str, line: int, kind: Optional[str] = None, attr: str = "") -> None:
        target = _owner(name, self.modules)
        if target is None or target == self.module:
            return
        edge = Edge(self.module, target, line, kind or ("local" if self.depth else "module"))
        if edge not in self.edges:
            self.edges.append(edge)
        if attr.startswith("_") and not attr.startswith("__") and _package(target) != _package(self.module):
            self.private.append(edge)

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_If = visit_Try = visit_With = _nested

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.generic_visit(node)  # a class body runs at import time

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _absolute(self.module, self.is_package, node.level, node.module) if node.level else node.module
        if not base or base.split(".")[0] != PACKAGE:
            return
        for alias in node.names:  # `from . import x` may name a submodule or an attribute of the package
            full = f"{base}.{alias.name}"
            self._add(full if full in self.modules else base, node.lineno, attr=alias.name)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, str) and value.startswith(PACKAGE + ".") and " " not in value:
            name = value.split(":", 1)[0]
            if name in self.modules:
                self._add(name, node.lineno, "string")


def _visit_all(modules: Dict[str, Path]) -> List[_Visitor]:
    out = []
    for module, path in modules.items():
        visitor = _Visitor(module, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        out.append(visitor)
    return out


def import_edges(modules: Optional[Dict[str, Path]] = None) -> List[Edge]:
    return [e for v in _visit_all(find_modules() if modules is None else modules) for e in v.edges]


def private_imports(modules: Optional[Dict[str, Path]] = None) -> List[Edge]:
    """Imports of a ``_private`` name from another package (``from ..engine.build import _helper``)."""
    return [e for v in _visit_all(find_modules() if modules is None else modules) for e in v.private]


def cycles(edges: Iterable[Edge], node=lambda m: m) -> List[List[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted; ``node`` maps a module
    to its node (itself; :func:`layer_of` for cycles between layers)."""
    graph: Dict[str, Set[str]] = defaultdict(set)
    for e in edges:
        a, b = node(e.source), node(e.target)
        if a != b:
            graph[a].add(b)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # iterative enough for a tree of a few hundred modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(list(graph)):
        if v not in index:
            visit(v)
    return sorted(found)


def allowed(source: str, target: str) -> bool:
    a, b = layer_of(source), layer_of(target)
    return a == b or b in ALLOWED[a]


def violations(edges: Iterable[Edge]) -> List[Edge]:
    return [e for e in edges if not allowed(e.source, e.target)]


def layer_edges(edges: Iterable[Edge]) -> Dict[Tuple[str, str], int]:
    out: Dict[Tuple[str, str], int] = defaultdict(int)
    for e in edges:
        a, b = layer_of(e.source), layer_of(e.target)
        if a != b:
            out[(a, b)] += 1
    return dict(out)


def check() -> Tuple[List[List[str]], List[Edge], List[Edge]]:
    """``(cycles between modules or layers, violations, private imports)`` of the source tree; all
    empty when the layering holds."""
    modules = find_modules()
    edges = import_edges(modules)
    return cycles(edges) + cycles(edges, layer_of), violations(edges), private_imports(modules)


def report(show_modules: bool = False) -> str:
    modules = find_modules()
    edges = import_edges(modules)
    lines = [f"{len(modules)} modules, {len({(e.source, e.target) for e in edges})} module edges "
             f"({sum(e.kind == 'local' for e in edges)} imports inside functions or blocks, "
             f"{sum(e.kind == 'string' for e in edges)} by name in a string)", "", "edges between layers:"]
    counts = layer_edges(edges)
    for (a, b), n in sorted(counts.items(), key=lambda kv: (ORDER.index(kv[0][0]), ORDER.index(kv[0][1]))):
        mark = "" if b in ALLOWED[a] else "   <- not allowed"
        lines.append(f"  {a:>10} -> {b:<10} {n:3d}{mark}")
    found = cycles(edges)
    lines += ["", f"cycles between modules: {len(found)}"] + [f"  {' <-> '.join(c)}" for c in found]
    found = cycles(edges, layer_of)
    lines += ["", f"cycles between layers: {len(found)}"] + [f"  {' <-> '.join(c)}" for c in found]
    bad = violations(edges)
    lines += ["", f"violations: {len(bad)}"]
    for e in sorted(bad, key=lambda e: (e.source, e.line)):
        lines.append(f"  {e.source} -> {e.target}  ({modules[e.source].relative_to(ROOT.parent)}:{e.line}, {e.kind})")
    private = private_imports(modules)
    lines += ["", f"private names imported from another package: {len(private)}"]
    lines += [f"  {e.source} -> {e.target}  ({modules[e.source].relative_to(ROOT.parent)}:{e.line})" for e in private]
    if show_modules:
        lines += ["", "modules:"]
        by_source: Dict[str, Set[str]] = defaultdict(set)
        for e in edges:
            by_source[e.source].add(e.target)
        for m in sorted(modules):
            lines.append(f"  {m} -> {', '.join(sorted(by_source[m])) or '-'}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", action="store_true", help="list every module's imports")
    args = p.parse_args(argv)
    print(report(args.modules))
    return 1 if any(check()) else 0


if __name__ == "__main__":
    sys.exit(main())
