"""The project's shape, checked from its source (docs/architecture.md says why each rule exists).

- No import cycle among the project's modules (`alignvec_gguf/`, `converters/`, `tests/`, `benchmarks/`,
  `examples/`), counting imports inside functions too: a lazy import that dodges a cycle is still one.
  Imports under ``if TYPE_CHECKING:`` are left out; they never run.
- Production code (`alignvec_gguf/`, `converters/`) never uses gguf-py's ``GGUFReader``: every read goes
  through ``alignvec_gguf.ggufread``. gguf-py's reader is the tests' independent oracle.
- The library never imports its commands (``alignvec_gguf.cli``).
- Tests never import benchmarks; benchmarks reach test code only through ``tests.support``.
- No module over about 400 lines without a reason: its docstring says ``Long module:`` and why.
- docs/architecture.md has a line for every module of `alignvec_gguf/`, `converters/`, `tests/support/`
  and `benchmarks/`, and each imports only what its line allows.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("alignvec_gguf", "converters", "tests", "benchmarks", "examples")
PRODUCTION = ("alignvec_gguf", "converters")
MAX_LINES = 400
LONG_MARK = "Long module:"
ARCHITECTURE = REPO / "docs" / "architecture.md"
MAPPED = ("alignvec_gguf", "converters", "tests.support", "benchmarks")
_ROW = re.compile(r"^\| `(?P<module>[\w.]+)` \|.*\| (?P<allowed>[^|]*) \|$")


@dataclass
class Module:
    name: str  # dotted, from the repository root: alignvec_gguf.merge, tests.support.tinymodels
    path: Path
    tree: ast.Module
    imports: list[tuple[str, int]] = field(default_factory=list)  # (dotted module, line)
    names: list[tuple[str, str, int]] = field(default_factory=list)  # (module, imported name, line)


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Iterator[Path]:
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).parts
            if any(p.startswith(".") or p in {"build", "__pycache__", "results"} for p in rel):
                continue
            yield path


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def load_modules() -> dict[str, Module]:
    """Every project module, parsed, with the project modules it imports."""
    found = {_dotted(p): Module(_dotted(p), p, ast.parse(p.read_text(), str(p))) for p in _sources()}
    for mod in found.values():
        skipped = _type_checking_nodes(mod.tree)
        package = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]
        for node in ast.walk(mod.tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(found, mod, alias.name)
                    if target:
                        mod.imports.append((target, node.lineno))
                    mod.names.append((alias.name, "", node.lineno))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    mod.names.append((source, alias.name, node.lineno))
                    # `from pkg import sub` imports the submodule where one exists.
                    target = _resolve(found, mod, f"{source}.{alias.name}") or _resolve(found, mod, source)
                    if target:
                        mod.imports.append((target, node.lineno))
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return load_modules()


def _resolve(found: dict[str, Module], importer: Module, name: str) -> str | None:
    """The project module an import names, or None for a third-party one.

    A bare name may also be a sibling file: scripts and tests run with their own directory on sys.path.
    """
    if name in found:
        return name
    sibling = ".".join([*importer.name.split(".")[:-1], name])
    if importer.path.name != "__init__.py" and sibling in found and "." not in name:
        return sibling
    return None


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    graph = {name: sorted({t for t, _ in m.imports}) for name, m in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _where(modules: dict[str, Module], component: list[str]) -> str:
    inside = set(component)
    edges = {
        f"{m} imports {t} (line {line})" for m in component for t, line in modules[m].imports if t in inside and t != m
    }
    return "; ".join(sorted(edges))


def test_the_checker_sees_the_project(modules: dict[str, Module]) -> None:
    # The rules below are only as good as the graph: it must hold the package and its known edges.
    assert "alignvec_gguf.merge" in modules and "alignvec_gguf.ggufread" in modules
    assert ("alignvec_gguf.ggufread", "alignvec_gguf.ggufheader") in {
        (m.name, t) for m in modules.values() for t, _ in m.imports
    }
    toy = {
        "a": Module("a", REPO / "a.py", ast.parse(""), [("b", 1)]),
        "b": Module("b", REPO / "b.py", ast.parse(""), [("a", 1)]),
        "c": Module("c", REPO / "c.py", ast.parse(""), [("a", 1)]),
    }
    assert _cycles(toy) == [["a", "b"]]


def test_no_import_cycles(modules: dict[str, Module]) -> None:
    cycles = _cycles(modules)
    assert not cycles, "import cycles: " + " | ".join(_where(modules, c) for c in cycles)


def test_production_code_never_uses_gguf_py_reader(modules: dict[str, Module]) -> None:
    offenders = []
    for mod in modules.values():
        if mod.name.split(".")[0] not in PRODUCTION:
            continue
        for source, name, line in mod.names:
            if source.split(".")[0] == "gguf" and name in {"GGUFReader", "ReaderTensor", "ReaderField", "gguf_reader"}:
                offenders.append(f"{mod.path.relative_to(REPO)}:{line} imports {name}")
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Attribute) and node.attr == "GGUFReader":
                offenders.append(f"{mod.path.relative_to(REPO)}:{node.lineno} uses {ast.unparse(node)}")
    assert not offenders, "; ".join(offenders)


def test_the_library_never_imports_its_commands(modules: dict[str, Module]) -> None:
    offenders = [
        f"{m.path.relative_to(REPO)}:{line} imports {t}"
        for m in modules.values()
        if m.name.startswith("alignvec_gguf") and not m.name.startswith("alignvec_gguf.cli")
        for t, line in m.imports
        if t == "alignvec_gguf.cli" or t.startswith("alignvec_gguf.cli.")
    ]
    assert not offenders, "; ".join(offenders)


def test_tests_and_benchmarks_share_only_the_support_package(modules: dict[str, Module]) -> None:
    offenders = []
    for m in modules.values():
        top = m.name.split(".")[0]
        for t, line in m.imports:
            if top == "tests" and t.startswith("benchmarks"):
                offenders.append(f"{m.path.relative_to(REPO)}:{line} imports {t}")
            if top == "benchmarks" and t.startswith("tests") and not t.startswith("tests.support"):
                offenders.append(f"{m.path.relative_to(REPO)}:{line} imports {t}")
    assert not offenders, "; ".join(offenders)


def test_long_modules_say_why(modules: dict[str, Module]) -> None:
    offenders = []
    for m in modules.values():
        lines = m.path.read_text().count("\n")
        doc = ast.get_docstring(m.tree) or ""
        if lines > MAX_LINES and LONG_MARK not in doc:
            offenders.append(f"{m.path.relative_to(REPO)} ({lines} lines)")
    assert not offenders, f"over {MAX_LINES} lines with no '{LONG_MARK} <why>' in the docstring: " + ", ".join(
        offenders
    )


def _full(name: str) -> str:
    """A module named as docs/architecture.md names it: relative to alignvec_gguf unless it is another root."""
    return name if name.split(".")[0] in ROOTS or name == "alignvec_gguf" else f"alignvec_gguf.{name}"


def architecture_map() -> dict[str, set[str]]:
    """docs/architecture.md's module tables: module -> the project modules (or packages) it may import."""
    rows: dict[str, set[str]] = {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line.strip())
        if m:
            allowed = set(re.findall(r"`([\w.]+)`", m["allowed"]))
            rows[_full(m["module"])] = {_full(a) for a in allowed}
    return rows


def _allows(allowed: set[str], target: str) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_the_architecture_map_is_the_code(modules: dict[str, Module]) -> None:
    rows = architecture_map()
    assert len(rows) > 40, "docs/architecture.md's module tables were not found"
    mapped = {n for n in modules if any(n == r or n.startswith(r + ".") for r in MAPPED)}
    assert not mapped - rows.keys(), f"modules with no line in docs/architecture.md: {sorted(mapped - rows.keys())}"
    assert not rows.keys() - modules.keys(), (
        f"docs/architecture.md names no such module: {sorted(rows.keys() - modules.keys())}"
    )
    offenders = [
        f"{m} imports {t} (line {line})"
        for m in sorted(mapped)
        for t, line in modules[m].imports
        if t != m and not _allows(rows[m], t)
    ]
    assert not offenders, "imports docs/architecture.md does not allow: " + "; ".join(offenders)
