"""The documentation's links and paths point at things that exist.

- Every relative Markdown link (and image) in the checked pages resolves to a file or
  folder of the repository, relative to the page; a ``#fragment`` into a Markdown page
  names one of its headings (GitHub's anchor rule).
- Every repository path written in code (a backticked span or a fenced block), such as
  ``ragserve/engine/pipeline.py``, ``docs/prompting.md`` or ``benchmarks/bench_http.py``,
  exists, relative to the repository root; a ``*`` in it must match something.
- Every dotted ``ragserve.x.y`` name written in code is a module of the package, and the
  attribute after it (``ragserve.jobs.warm.warm``) is defined or imported at its top level,
  read from the source with ``ast``: nothing is imported.
- Every ``docs/*.md`` page is linked from the README.

Fast and import-free: the whole module reads a few dozen files.
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PAGES = sorted(
    [ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "profiling" / "README.md",
     ROOT / "indexes" / "README.md", *(ROOT / "docs").glob("*.md")]
)

# Top-level folders whose paths, written in code, must exist. `indexes/` holds built
# indexes (only its README is committed) and `profiling/reports/` profiling output, so
# paths under them are examples, not files of the repository.
CHECKED_TOP = ("ragserve", "docs", "scripts", "benchmarks", "tests", "deploy", "requirements",
               "profiling", "indexes")
NOT_COMMITTED = ("indexes/", "profiling/reports")
COMMITTED_ANYWAY = {"indexes/", "indexes/README.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w.*/-]*)" % "|".join(CHECKED_TOP))
DOTTED = re.compile(r"(?<![\w./-])ragserve(?:\.[A-Za-z_]\w*)+(?![\w/-])")
FILE_SUFFIXES = (".toml", ".md", ".json", ".jsonl", ".py", ".txt", ".yaml")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """The fenced blocks and the backticked spans of a page."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    rest = FENCE.sub("", text)
    return blocks + [m.group(2) for m in CODE_SPAN.finditer(rest)]


def _prose(text: str) -> str:
    """The page without its code, where Markdown links live."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def _exists(path: Path) -> bool:
    return path.exists()


def _matches(pattern: str) -> bool:
    """A glob such as ``benchmarks/bench_serving*.py`` matches something."""
    return any(ROOT.glob(pattern))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def _anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", _text(page)).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


def _link_problems(page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(_prose(_text(page))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not _exists(dest):
            problems.append(f"{target}: no such file or folder")
        elif fragment and dest.suffix == ".md" and dest.exists():
            if fragment not in _anchors(dest):
                problems.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    return problems


def _path_problems(page: Path) -> list[str]:
    problems = []
    for code in _code(_text(page)):
        for raw in REPO_PATH.findall(code):
            path = raw.rstrip(".,:;")
            if path.startswith(NOT_COMMITTED) and path not in COMMITTED_ANYWAY:
                continue
            last = path.rstrip("/").rsplit("/", 1)[-1]
            # A file (it has a suffix), a folder (written with its slash), or the whole span.
            if not (path.endswith("/") or "." in last or "*" in last or path == code.strip()):
                continue
            if "*" in path:
                if not _matches(path):
                    problems.append(f"{path}: matches nothing")
            elif not _exists(ROOT / path):
                problems.append(f"{path}: no such file or folder")
    return problems


@cache
def _module_names(path: Path) -> frozenset[str]:
    """Names bound at the top level of a module (and, for a package, its submodules)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if path.name == "__init__.py":
        names.update(p.stem for p in path.parent.glob("*.py"))
        names.update(p.name for p in path.parent.iterdir() if (p / "__init__.py").exists())
    return frozenset(names)


def _class_names(path: Path, cls: str) -> frozenset[str] | None:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            names = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            return frozenset(names)
    return None  # imported from elsewhere: not followed


def _dotted_problem(name: str) -> str | None:
    parts = name.split(".")
    if name.endswith(FILE_SUFFIXES):
        return None  # a file name such as ragserve.toml
    # The longest prefix that is a module or package of the repository.
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.exists():
            break
    else:
        return f"{name}: not a module"
    attrs = parts[i:]
    if not attrs:
        return None
    if attrs[0] not in _module_names(module):
        return f"{name}: {'.'.join(parts[:i])} has no {attrs[0]}"
    if len(attrs) > 1:
        members = _class_names(module, attrs[0])
        if members is not None and attrs[1] not in members:
            return f"{name}: {attrs[0]} has no {attrs[1]}"
    return None


def _dotted_problems(page: Path) -> list[str]:
    found = {m.group(0) for code in _code(_text(page)) for m in DOTTED.finditer(code)}
    return [p for p in map(_dotted_problem, sorted(found - _telemetry_names(found))) if p]


def _telemetry_names(found: set[str]) -> set[str]:
    """The names among ``found`` that are span, attribute or logger names ragserve emits
    (``ragserve.cache.tier``, ``ragserve.<stage>``, ``ragserve.access``): dotted like a
    module, but not one."""
    from ragserve.observe.timing import stage_layout

    files = ("observe/traces.py", "observe/spanbuild.py", "observe/genai.py", "observe/propagation.py",
             "server/tracing.py", "server/middleware.py")
    source = "".join((ROOT / "ragserve" / p).read_text("utf-8") for p in files)
    emitted = {m.group(1).rstrip(".") for m in re.finditer(r'"(ragserve\.[\w.]*)', source)}
    emitted |= {f"ragserve.{stage}" for stage in stage_layout()[0]}
    return {n for n in found if n in emitted or any(e.startswith(n + ".") for e in emitted)}


def _ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages]


def test_the_checked_pages_exist() -> None:
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page: Path) -> None:
    assert _link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_repository_paths_in_code_exist(page: Path) -> None:
    assert _path_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_dotted_ragserve_names_exist(page: Path) -> None:
    assert _dotted_problems(page) == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = ROOT / "README.md"
    linked = set()
    for target in LINK.findall(_prose(_text(readme))):
        path_part = target.partition("#")[0]
        if path_part and not re.match(r"[a-z][a-z0-9+.-]*:", path_part):
            linked.add((ROOT / path_part).resolve())
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert [str(p.relative_to(ROOT)) for p in pages if p not in linked] == []


def test_the_checks_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks find a broken link, a bad anchor, a missing path and a stale module."""
    page = ROOT / "docs" / "_probe.md"  # never written: only its path is used
    text = ("[gone](nowhere.md) [bad anchor](../README.md#no-such-heading)\n"
            "[ok](../README.md#on-a-fresh-machine-two-commands) [ok too](serving.md#endpoints)\n"
            "`ragserve/no_such_module.py` `ragserve.warm.warm` `ragserve.jobs.warm.warm`\n"
            "`benchmarks/bench_http.py` `benchmarks/bench_serving*.py` `benchmarks/no_bench*.py`\n")
    real = _text
    monkeypatch.setattr(sys.modules[__name__], "_text", lambda p: text if p == page else real(p))
    assert [p.split(":")[0] for p in _link_problems(page)] == ["nowhere.md", "../README.md#no-such-heading"]
    assert _path_problems(page) == ["ragserve/no_such_module.py: no such file or folder",
                                    "benchmarks/no_bench*.py: matches nothing"]
    assert _dotted_problems(page) == ["ragserve.warm.warm: ragserve has no warm"]
