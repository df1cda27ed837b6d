"""The packages import cleanly: no module of kernels, mer, carn or camhg imports (at module level, directly or through
others) a module that imports it back, every module imports in a fresh interpreter in dependency order, and no public
name of ``kernels`` is shadowed by (or shadows) one of its modules."""
from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "mer", "carn", "camhg")


def project_modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (``kernels.tools.report``; a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _module_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """The import statements that run when the module is imported: not inside functions, not under
    ``if TYPE_CHECKING:``."""
    found = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                visit([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)])

    visit(tree.body)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules its module-level imports load: ``from P import name`` loads ``P.name`` when
    that is a module, else ``P`` itself (a package's ``__init__``); ``import P.Q`` loads ``P.Q``."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            edges |= {target for target in targets if target in modules and target != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def topological_order(graph: dict[str, set[str]]) -> list[str]:
    """Dependencies before the modules that import them."""
    order, done = [], set()

    def visit(node):
        if node in done:
            return
        done.add(node)
        for target in sorted(graph[node]):
            visit(target)
        order.append(node)

    for node in sorted(graph):
        visit(node)
    return order


def test_no_import_circle():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert topological_order({"a": {"b"}, "b": {"c"}, "c": set()}) == ["c", "b", "a"]


def test_import_graph_reads_relative_and_nested_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    files = {"pkg/__init__.py": "from .a import f\n", "pkg/a.py": "from . import b\nimport pkg.c\n"
             "def g():\n    from pkg import d\n", "pkg/b.py": "from typing import TYPE_CHECKING\n"
             "if TYPE_CHECKING:\n    from pkg import a\n", "pkg/c.py": "", "pkg/d.py": "from pkg.a import g\n"}
    for relative, text in files.items():
        (tmp_path / relative).write_text(text)
    modules = {"pkg": tmp_path / "pkg/__init__.py", **{f"pkg.{n}": tmp_path / f"pkg/{n}.py" for n in "abcd"}}
    assert import_graph(modules) == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": set(), "pkg.c": set(),
                                     "pkg.d": {"pkg.a"}}


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    order = topological_order(import_graph(project_modules()))
    script = ("import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
              "print(len(sys.argv) - 1)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script, *order], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == str(len(order))


def test_no_public_name_of_kernels_is_also_a_module_name():
    """``kernels.block_causal_attention`` is a function: no module may be called that, or ``import
    kernels.block_causal_attention`` (or a mock path) would replace one by the other."""
    import kernels

    submodules = {info.name for info in pkgutil.iter_modules(kernels.__path__)}
    clashes = [name for name in kernels.__all__
               if not isinstance(getattr(kernels, name), types.ModuleType) and name in submodules]
    assert clashes == []
    assert "block_causal_attention" not in submodules and "entmax15_attention" not in submodules
