"""The floors, read from the code's own imports (docs/design.md, "Floors"):
core ``prepaid`` <- services ``agi``, ``ami_listener``, ``policy`` <- shell ``shell``.

Every ``import`` of every module is parsed with ``ast`` (also those inside functions), so a
late import is caught like a top-level one, and so is an import by string."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = "prepaid"
SERVICES = ("agi", "ami_listener", "policy")
SHELL = "shell"
PROJECT = (CORE, *SERVICES, SHELL)
# Who may import whom, beside itself, the standard library and third-party packages.
ALLOWED: dict[str, frozenset[str]] = {
    CORE: frozenset(),
    **{s: frozenset({CORE}) for s in SERVICES},
    SHELL: frozenset({CORE, *SERVICES}),
}
# Where an import by string would hide an edge from the reader and from this test.
STRING_IMPORT_DIRS = (*PROJECT, "bench", "testbed")


@dataclass(frozen=True)
class Edge:
    path: str
    line: int
    imported: str  # the dotted module name


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imports(path: Path, root: Path = REPO) -> list[Edge]:
    tree = ast.parse(path.read_text(), str(path))
    rel = str(path.relative_to(root))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Edge(rel, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                continue
            base = node.module or ""
            found.append(Edge(rel, node.lineno, base))
    return found


def string_imports(path: Path, root: Path = REPO) -> list[str]:
    """Calls of importlib.import_module, __import__ and importlib.__import__."""
    tree = ast.parse(path.read_text(), str(path))
    rel = str(path.relative_to(root))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (f.id if isinstance(f, ast.Name)
                else f.attr if isinstance(f, ast.Attribute) else "")
        if name in ("import_module", "__import__"):
            found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    for node in ast.walk(tree):  # `from importlib import import_module` as well
        if isinstance(node, ast.ImportFrom) and node.module == "importlib" and any(
                a.name == "import_module" for a in node.names):
            found.append(f"{rel}:{node.lineno}: from importlib import import_module")
    return found


def top(name: str) -> str:
    return name.split(".", 1)[0]


def violations(package: str) -> list[str]:
    bad = []
    for path in modules(package):
        for edge in imports(path):
            other = top(edge.imported)
            if other in PROJECT and other != package and other not in ALLOWED[package]:
                bad.append(f"{edge.path}:{edge.line}: imports {edge.imported}")
    return bad


def test_every_package_is_where_the_floors_expect_it() -> None:
    for package in PROJECT:
        assert (REPO / package / "__init__.py").is_file(), package
        assert modules(package), package


def test_the_core_imports_none_of_the_services_nor_the_shell() -> None:
    assert violations(CORE) == []


def test_each_service_imports_only_itself_and_the_core() -> None:
    assert [v for s in SERVICES for v in violations(s)] == []


def test_nothing_but_the_shell_imports_the_shell() -> None:
    """(The tests and the benchmarks drive it from outside the floors.)"""
    paths = [p for pkg in (CORE, *SERVICES) for p in modules(pkg)]
    bad = [f"{e.path}:{e.line}: imports {e.imported}" for p in paths for e in imports(p)
           if top(e.imported) == SHELL]
    assert bad == []


def test_the_test_bed_and_the_benchmarks_import_nothing_of_the_tests() -> None:
    """Tests, benchmarks and the demo share the test bed; no test module is a toolbox."""
    paths = [p for d in ("testbed", "bench") for p in modules(d)]
    bad = [f"{e.path}:{e.line}: imports {e.imported}" for p in paths for e in imports(p)
           if top(e.imported) == "tests"]
    assert bad == []


def test_no_import_by_string() -> None:
    bad = [s for d in STRING_IMPORT_DIRS for p in modules(d) for s in string_imports(p)]
    assert bad == []


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph(root: Path = REPO, packages: tuple[str, ...] = PROJECT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import mod`` names pkg.mod)."""
    paths = {module_name(p, root): p for pkg in packages for p in sorted(
        (root / pkg).rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        out = edges.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in paths)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & paths.keys()
                out.update(subs or ({node.module} & paths.keys()))
        out.discard(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first, in name order)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_loop() -> None:
    assert cycles(graph()) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The parser finds late imports and string imports, so the tests above can fail."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from prepaid.callrecord import hold_id\n"
                   "    import importlib\n    return importlib.import_module('policy.worker')\n")
    assert [(e.line, e.imported) for e in imports(src, tmp_path)] == [
        (2, "prepaid.callrecord"), (3, "importlib")]
    assert len(string_imports(src, tmp_path)) == 1
    for pkg, body in (("a", "from b import y\n"), ("b", "def g():\n    import a.x\n")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / ("x.py" if pkg == "a" else "y.py")).write_text(body)
    assert cycles(graph(tmp_path, ("a", "b"))) == [["a.x", "b.y", "a.x"]]

