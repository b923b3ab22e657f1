"""The layers of pipeline/: imports go down only (core < data < diffusion, cache, heads,
reporting < extraction < loops < plan), no loop imports another, no cycles, and no function-level
imports but deliberately deferred optional ones."""

from __future__ import annotations

import ast

from _deps import ROOT, imported_files

LAYERS = {
    "core": 0,
    "data": 1,
    "diffusion": 2,
    "cache": 2,
    "heads": 2,
    "reporting": 2,
    "extraction": 3,
    "loops": 4,
    "plan": 5,
}
# Deferred on purpose, with a comment at the import: diffusers' pipeline module (it loads
# transformers' image processors, which warn without torchvision).
DEFERRED = {("pipeline/diffusion/model.py", "diffusers")}


def _layer(rel: str) -> str:
    return rel.split("/")[1]


def test_every_module_is_in_a_layer() -> None:
    for path in (ROOT / "pipeline").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel != "pipeline/__init__.py":
            assert _layer(rel) in LAYERS, f"{rel}: not in a layer folder {sorted(LAYERS)}"


def test_no_loop_imports_another() -> None:
    """loops/ holds only the stage bodies: what several share lives in the layer of its kind."""
    wrong = []
    for path in (ROOT / "pipeline" / "loops").glob("*.py"):
        wrong += [f"{path.name} imports {d}" for d in imported_files(path) if "/loops/" in d]
    assert not wrong, wrong


def test_imports_go_down_the_layers_only() -> None:
    wrong = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "pipeline/__init__.py":
            continue
        for dep in imported_files(path):
            same = _layer(dep) == _layer(rel)
            if not same and LAYERS[_layer(dep)] >= LAYERS[_layer(rel)]:
                wrong.append(f"{rel} imports {dep}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = {
        p.relative_to(ROOT).as_posix(): imported_files(p) for p in (ROOT / "pipeline").rglob("*.py")
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*trail, node, dep])
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_function_level_imports_but_the_deferred_ones() -> None:
    found = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        name = (
                            node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        )
                        found.add((rel, name.split(".")[0]))
    assert found == DEFERRED
