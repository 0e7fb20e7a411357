"""The house (docs: STYLE.md): which package may import which, read from the source.

``mnemos`` is the protocol every role shares, so it imports no role; the roles import
``mnemos`` and not each other (a worker may use the registry's stores), and the launchers
(the CLI and ``mnemos up``) sit above them all. Every import counts, also one inside a
function or under ``TYPE_CHECKING``: a lazy import is a dependency all the same. Inside
``mnemos`` the imports form no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: First-party package -> the first-party packages it may import.
ALLOWED: dict[str, frozenset[str]] = {
    "mnemos": frozenset(),
    "control_plane": frozenset({"mnemos"}),
    "registry": frozenset({"mnemos"}),
    "neuron_runtime": frozenset({"mnemos", "registry"}),  # workers download through the registry's stores
    "launchers": frozenset({"mnemos", "control_plane", "neuron_runtime", "registry"}),
    "loadtest": frozenset({"mnemos", "control_plane", "neuron_runtime", "registry", "launchers"}),
}
PACKAGES = tuple(ALLOWED)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    """Every module of ``package``, by dotted name."""
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file, at any depth. ``import a.b``
    gives ``a.b``; ``from a import b`` gives ``a.b`` if that is a module in ``known``, else
    ``a``; relative imports are resolved; ``importlib.import_module("a.b")`` with a literal
    name counts too."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, *([module] if module else [])])
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield (sub if sub in known else module), node.lineno
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node.args[0].value, node.lineno


def first_party(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in ALLOWED else None


def test_every_package_is_scanned() -> None:
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package
    # The scanner sees lazy imports (the CLI imports the roles inside its commands).
    found = {m for m, _ in imports(ROOT / "launchers" / "cli.py", "launchers.cli", all_modules())}
    assert {"control_plane.main", "neuron_runtime.main", "mnemos.client"} <= found


def all_modules() -> set[str]:
    return {name for package in PACKAGES for name in modules(package)}


def test_each_package_imports_only_what_it_may() -> None:
    """The protocol imports no role or launcher; no role imports another role (but the
    registry) or the launchers."""
    known = all_modules()
    wrong = []
    for package, allowed in ALLOWED.items():
        for name, path in modules(package).items():
            for imported, line in imports(path, name, known):
                other = first_party(imported)
                if other is not None and other != package and other not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert sorted(set(wrong)) == []


def mnemos_graph() -> dict[str, set[str]]:
    """Module -> the modules of ``mnemos`` it imports."""
    known = modules("mnemos")
    return {
        name: {m for m, _ in imports(path, name, set(known)) if m in known and m != name}
        for name, path in known.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_mnemos_modules_import_each_other_in_no_cycle() -> None:
    graph = mnemos_graph()
    assert "mnemos.messages" in graph["mnemos.client"]  # the graph is not empty by mistake
    assert cycles(graph) == []
