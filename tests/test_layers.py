"""The import graph of schemas/, stages/ and pipeline/ reads top to bottom (CONTRIBUTING.md, Layers).

Built with `ast` from the source (every import statement, also inside functions and under
TYPE_CHECKING): pipeline -> stages -> schemas, no cycles, no stage module importing another
stage's modules, no file over the size limit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from schemas.stages import STAGE_NAMES

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "stages", "pipeline")
LAYER = {"schemas": 0, "stages": 1, "pipeline": 2}
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (`from a.b import c` counts a.b.c when that is a module, else a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def stage_of(module: str) -> str | None:
    """The stage a module belongs to (stages.<stage> and its submodules), None for shared code."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "stages" and parts[1] in STAGE_NAMES else None


def test_no_import_points_upward():
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if LAYER[target.split(".")[0]] > LAYER[module.split(".")[0]]
    ]
    assert not upward, "imports must go pipeline -> stages -> schemas:\n" + "\n".join(upward)


def test_no_stage_imports_another_stage():
    crossing = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if stage_of(module) and stage_of(target) and stage_of(module) != stage_of(target)
    ]
    assert not crossing, "stage modules share code only through modules below them:\n" + "\n".join(crossing)


def test_shared_stage_code_imports_no_stage():
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if module.startswith("stages") and stage_of(module) is None and stage_of(target)
    ]
    assert not upward, "shared code under stages/ sits below the stages:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"], "the finder finds one"
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative import both count, and the
    real graph has the edges everyone knows are there."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "a.py").write_text("def f():\n    from pipeline import flow\n")
    (tmp_path / "stages" / "b.py").write_text("from . import a\n")
    known = {"stages", "stages.a", "stages.b", "pipeline", "pipeline.flow"}
    assert imported_modules(tmp_path / "stages" / "a.py", "stages.a", known) == {"pipeline.flow"}
    assert imported_modules(tmp_path / "stages" / "b.py", "stages.b", known) == {"stages.a"}
    graph = import_graph()
    assert {"pipeline.runner", "pipeline.storage"} <= graph["pipeline.flow"]
    assert "stages.io" in graph["stages.advantage"]


@pytest.mark.parametrize("package", ["stages", "pipeline"])
def test_no_file_is_over_the_size_limit(package):
    long = {str(p.relative_to(REPO)): n for p in (REPO / package).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these files by idea (over {MAX_LINES} lines): {long}"


def test_no_test_module_imports_another():
    """Tests share builders through tests/support/, never through another test module."""
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name} imports {n}" for n in names if n.startswith("tests.test_") or n.startswith("test_")]
    assert not offenders, offenders
