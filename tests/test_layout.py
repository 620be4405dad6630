"""The package's floor plan, checked on the source (docs/design.md, Layout).

- Module-level imports between ``meanflow`` modules form no cycle.
- No module imports another module's private (underscored) name.
- Imports inside functions only where an optional dependency demands it: the Triton kernel's
  module (importing Triton costs about a second, and most runs never use it).
- No module is over 500 lines; the training loop stays under 450.
- Nothing in the repository points at a document outside it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "meanflow"

# (importing module, imported module): the function-local imports that are allowed, and why
LAZY_ALLOWED = {
    ("meanflow.models.attention", "meanflow.models.attention_triton"): "imports triton",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _target(module: str, name: str) -> str:
    """``from module import name``: the submodule when ``name`` is one, else ``module``."""
    return f"{module}.{name}" if f"{module}.{name}" in MODULES else module


def _resolve(importer: str, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    pkg = importer.split(".")
    if not MODULES[importer].name == "__init__.py":
        pkg = pkg[:-1]
    base = pkg[:len(pkg) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


class _Imports(ast.NodeVisitor):
    """Module-level, function-local and private imports of one module."""

    def __init__(self, name: str):
        self.name = name
        self.depth = 0
        self.top: set[str] = set()
        self.lazy: set[str] = set()
        self.private: set[tuple[str, str]] = set()

    def _add(self, target: str) -> None:
        if target.startswith("meanflow") and target != self.name:
            (self.lazy if self.depth else self.top).add(target)

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        # `if TYPE_CHECKING:` imports never run
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node):
        module = _resolve(self.name, node)
        if not module or not module.startswith("meanflow"):
            return
        for alias in node.names:
            self._add(_target(module, alias.name))
            dunder = alias.name.startswith("__") and alias.name.endswith("__")
            if alias.name.startswith("_") and not dunder and _target(module, alias.name) == module:
                self.private.add((module, alias.name))


def _scan() -> dict[str, _Imports]:
    out = {}
    for name, path in MODULES.items():
        visitor = _Imports(name)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        out[name] = visitor
    return out


def test_the_scan_sees_imports():
    """The checks below are not vacuous: the scan finds the package's known edges."""
    scan = _scan()
    assert "meanflow.errors" in scan["meanflow.world"].top
    assert "meanflow.models.attention_triton" in scan["meanflow.models.attention"].lazy
    assert len(MODULES) > 40


def test_module_level_imports_form_no_cycle():
    graph = {name: imp.top for name, imp in _scan().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycles.append(" -> ".join(stack[stack.index(node):] + (node,)))
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # importing a submodule runs its package's __init__ first
            visit(nxt, stack + (node,))
        state[node] = 2

    for node in sorted(graph):
        visit(node, ())
    assert cycles == []


def test_no_private_name_crosses_a_module():
    private = {(name, mod, n) for name, imp in _scan().items() for mod, n in imp.private}
    assert private == set()


def test_function_local_imports_only_for_optional_dependencies():
    lazy = {(name, target) for name, imp in _scan().items() for target in imp.lazy}
    assert lazy == set(LAZY_ALLOWED)


def test_modules_stay_readable_in_length():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in lengths.items() if n > 500} == {}
    assert lengths["meanflow.train.loop"] < 450


def _documents_in_repo() -> set[str]:
    return {p.name for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]}


def _outside_citations(text: str, docs: set[str]) -> list[str]:
    """What ``text`` cites that the repository does not hold: a ``*.md`` file that is not one of
    ours, a section (``X §``) of anything but the paper or one of our documents, or a
    ``*-NOTES`` file."""
    bad = [m for m in re.findall(r"([\w.-]+\.md)\b", text) if m not in docs]
    bad += [f"{m} §" for m in re.findall(r"([\w./-]+) §", text)
            if m != "paper" and Path(m).name not in docs]
    bad += re.findall(r"\b[A-Z]+-NOTES\b", text)
    return bad


def test_the_citation_check_sees_outside_documents():
    docs = _documents_in_repo()
    assert {"method.md", "design.md", "README.md"} <= docs
    assert _outside_citations("see docs/method.md §12 and paper §4", docs) == []
    outside = "see NOTES.md, ABC §2 and FOO-NOTES"
    assert _outside_citations(outside, docs) == ["NOTES.md", "ABC §", "FOO-NOTES"]


def test_nothing_cites_a_document_outside_the_repository():
    """Comments, docs and scripts cite docs/ (or the paper), never notes kept elsewhere."""
    docs = _documents_in_repo()
    files = [p for d in ("src", "docs", "benchmarks", "experiments", "tests", ".ci")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh", "")
             and p.is_file() and ".egg-info" not in str(p) and "__pycache__" not in str(p)]
    files += [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    hits = [f"{p.relative_to(ROOT)}: {bad}" for p in files if p != Path(__file__)
            for bad in _outside_citations(p.read_text(errors="replace"), docs)]
    assert hits == []
