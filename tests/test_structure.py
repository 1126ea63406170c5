"""The package's shape: stage packages instead of prefixed flat modules, no import circles, and imports
that go one way down the layers (cli and serve on top; the stages; the shared spine; the leaves)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mnist_deploy"
TOP_LEVEL_MODULES = {"__init__", "__main__", "devices", "errors", "faults", "metrics", "models", "plots", "predict"}
PACKAGES = {"artifacts", "bench", "cli", "data", "export", "formats", "package", "serve", "train"}
# Layer of each top-level unit: a module may import from its own layer's unit or from a lower layer only.
# The package root holds only __version__ and lazy re-exports, so any module may read __version__ from it.
LAYERS = {
    "__main__": 5, "cli": 4, "__init__": -2, "serve": 3,
    "train": 2, "export": 2, "bench": 2, "predict": 2, "package": 2,
    "formats": 1, "data": 1,
    "models": 0, "metrics": 0, "artifacts": 0, "plots": 0, "devices": 0,
    "errors": -1, "faults": -1,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``name`` imports, at the top or inside a function."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
            elif node.module and node.module.split(".")[0] == "mnist_deploy":
                base = []
            else:
                continue
            mod = ".".join(base + (node.module.split(".") if node.module else []))
            if not node.level:
                mod = ".".join(node.module.split(".")[1:])
            for alias in node.names:
                sub = f"{mod}.{alias.name}" if mod else alias.name
                found.add(sub if sub in known else (mod or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mnist_deploy."):
                    found.add(alias.name.split(".", 1)[1])
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_stage_family_is_left_flat():
    tops = {p.stem for p in PKG.glob("*.py")}
    assert tops == TOP_LEVEL_MODULES, f"unexpected top-level modules: {sorted(tops - TOP_LEVEL_MODULES)}"
    dirs = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert dirs == PACKAGES


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    graph = _graph()
    assert graph["export.run"] >= {"export.parity", "export.verify"}  # the walker sees real edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_go_down_the_layers_and_no_stage_imports_another():
    bad = []
    for mod, deps in _graph().items():
        unit = mod.split(".")[0]
        for dep in deps:
            dep_unit = dep.split(".")[0]
            if dep_unit != unit and LAYERS[dep_unit] >= LAYERS[unit]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 65  # "about 60": a function a reader takes in at once; cli/ commands are exempt


def _sizes() -> tuple[list[str], list[str]]:
    modules, functions = [], []
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(PKG)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            modules.append(f"{rel}: {len(text.splitlines())} lines")
        if rel.parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    functions.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    return modules, functions


def test_modules_and_functions_stay_readable_sizes():
    modules, functions = _sizes()
    assert modules == [], f"modules over {MAX_MODULE_LINES} lines"
    assert functions == [], f"functions outside cli/ over {MAX_FUNCTION_LINES} lines"
