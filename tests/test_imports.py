"""The import graph of streamspec's own modules has no cycles.

Every import counts, those inside functions (lazy imports) included, except those
under `if TYPE_CHECKING:`, which only type checkers run. A cycle makes the import
order matter and hides which module owns what (runtime/engine.py and conversation.py,
models/checkpoint.py and vocab.py once imported each other).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"runtime": "streamspec.runtime", "models": "streamspec.models", "exporter": "streamspec.exporter",
            "tools": "streamspec.tools", "streamspec": "streamspec"}  # folder -> package (pyproject.toml)


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    return ".".join([PACKAGES[folder], *(part for part in rest if part != "__init__")])


def imported(path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that the file at `path` imports, outside TYPE_CHECKING blocks."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, `level` - 1 packages up
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                # `from package import module` imports the module; `from module import name`, the module
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found & modules - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> the modules it imports), [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    files = [path for folder in PACKAGES for path in (ROOT / folder).rglob("*.py")]
    modules = {module_name(path) for path in files}
    graph = {module_name(path): imported(path, modules) for path in files}
    assert graph["streamspec.runtime.engine"] >= {"streamspec.runtime.conversation"}  # the scan sees imports
    assert find_cycle(graph) == []
