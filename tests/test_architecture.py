"""The package's shape (issue 16): no import circle, Horovod behind dist.py, the loop on one screen."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adabatch_hvd"


def imports(path: Path, top_level_only: bool) -> set:
    """The package modules `path` imports (relative imports: `from . import x`, `from .x import y`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adabatch_hvd."):
            found.add(node.module.split(".")[1])
    return {m for m in found if (PACKAGE / f"{m}.py").exists()}


def graph(top_level_only: bool) -> dict:
    return {p.stem: imports(p, top_level_only) for p in PACKAGE.glob("*.py")}


def cycle(g: dict):
    """A cycle in the graph as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_module_imports_form_no_circle():
    assert cycle(graph(top_level_only=True)) is None
    assert cycle(graph(top_level_only=False)) is None  # deferred imports included


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_only_dist_imports_horovod():
    users = sorted(p.name for p in PACKAGE.glob("*.py") if any(
        isinstance(n, (ast.Import, ast.ImportFrom)) and any(
            (a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] == "horovod"
            for a in (n.names if isinstance(n, ast.Import) else [n]))
        for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["dist.py"], users


def test_the_training_loop_fits_on_one_screen():
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = {n.name: n.end_lineno - n.lineno + 1 for n in trainer.body if isinstance(n, ast.FunctionDef)}
    assert methods["_fit"] <= 30 and methods["_train_epoch"] <= 60, methods
