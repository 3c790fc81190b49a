"""The architecture, checked: the tree, the import contracts, no cycles, no reaching into
another module's private attributes, and ``docs/architecture.md`` agreeing with all of it."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ragserve"
PUBLIC_FACE = {"__init__.py", "_version.py", "rag.py", "types.py", "errors.py"}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def wings() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def contract_layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    return [[m.strip() for m in layer.split("|")] for layer in layers]


def lint_imports(project: Path, package_parent: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(project / "pyproject.toml")],
                          cwd=project, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package_parent)})


def test_the_top_of_the_package_is_only_the_public_face_and_the_wings():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules == PUBLIC_FACE, f"modules at the top of ragserve/ that belong in a wing: {modules - PUBLIC_FACE}"
    loose = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not (p / "__init__.py").exists()
             and p.name != "__pycache__"}
    assert not loose, f"folders without __init__.py: {loose}"


def test_every_wing_is_in_the_import_contract_and_on_the_architecture_page():
    in_contract = {m.removeprefix("ragserve.") for layer in contract_layers() for m in layer}
    page = (ROOT / "docs" / "architecture.md").read_text()
    on_page = set(re.findall(r"^\| \d+ \| `([a-z_]+)/`", page, re.M))
    assert wings() <= in_contract, f"wings no contract layer names: {wings() - in_contract}"
    assert in_contract - {"rag", "types", "errors"} <= wings(), \
        f"contract layers with no wing: {in_contract - {'rag', 'types', 'errors'} - wings()}"
    assert on_page == wings(), (f"docs/architecture.md names {sorted(on_page - wings())} that are not wings "
                                f"and misses {sorted(wings() - on_page)}")


def test_the_page_lists_the_layers_in_the_contracts_order():
    page = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([a-z_]+)(?:/|\.py)`", page, re.M)
    layer_of = {name: int(n) for n, name in rows}
    for depth, layer in enumerate(contract_layers(), start=1):
        for module in layer:
            name = module.removeprefix("ragserve.")
            assert layer_of.get(name) == depth, f"{name}: layer {layer_of.get(name)} on the page, {depth} in the contract"


def test_the_import_contracts_hold():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_the_contracts(tmp_path):
    """The engine importing the server (a deliberate violation, in a copy) must fail them."""
    copy = tmp_path / "project"
    shutil.copytree(PACKAGE, copy / "ragserve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    flight = copy / "ragserve" / "engine" / "flight.py"
    flight.write_text(flight.read_text() + "\nimport ragserve.server.app  # the violation\n")
    result = lint_imports(copy, copy)
    assert result.returncode != 0
    assert "ragserve.engine.flight -> ragserve.server.app" in result.stdout


def test_no_import_cycles():
    """Between any two modules, counting imports inside functions too: a loop is broken by
    moving the shared piece, never by a late import."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("ragserve", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert not _cycles(edges)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Names an object of another library legitimately exposes with an underscore.
FOREIGN = {("os", "_Environ"), ("os", "_exit"), ("sys", "_getframe"),
           ("atexit", "_run_exitfuncs"), ("threading", "_shutdown")}  # the standard library's, for exit_fast


def private_reaches(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` or ``cls``: reading another object's private state."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or (owner.id, node.attr) in FOREIGN):
                continue
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reads_another_modules_private_attributes():
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").rglob("*.py"), *(ROOT / "profiling").rglob("*.py")]
    if (ROOT / "benchmarks").is_dir():
        paths += (ROOT / "benchmarks").rglob("*.py")
    assert private_reaches(paths) == []


def test_the_private_reach_check_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(rag):\n    return rag._runtime.loop, self_like._x, os._exit\n")
    assert sorted(line.split(": ", 1)[1] for line in private_reaches([probe], tmp_path)) == ["rag._runtime", "self_like._x"]
