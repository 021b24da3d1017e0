"""The package's one-way flow, as the README's Architecture section draws it.

commands -> (demo, sweep, report) -> launch -> registry -> engine -> modeling -> memory -> data,
with evaluation under engine and the leaf modules (config, io, errors, the weights cache) under
all. The weights package spans two levels: its cache and file readers are leaves (the encoders
and the checkpointer resolve names through them); what loads files into maps' architectures
(``weights.verify``) and what a run needs (``weights.runs``) sit just under the engine.
Every import counts, those inside functions too: a lazy import back up the chain is still an
arrow back up, and it is how import circles start.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "maps"

#: higher may import lower (or the same layer's own package); never the other way round
LAYERS = {
    "cli": 10, "commands": 10, "__main__": 10,
    "demo": 9,
    "sweep": 8, "report": 8,
    "launch": 7,
    "registry": 6,
    "engine": 5,
    "weights.verify": 4.5, "weights.runs": 4.5,
    "evaluation": 4,
    "modeling": 3,
    "memory": 2,
    "data": 1,
    "weights": 0, "config": 0, "io": 0, "errors": 0, "__init__": 0,
}


def _unit(module: str) -> str:
    """``maps.launch.plan`` -> ``launch``; ``maps.io`` -> ``io``; ``maps.weights.runs`` ->
    ``weights.runs`` (a sub-level of its own)."""
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[1:3]) in LAYERS:
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("maps.") or alias.name == "maps":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "maps":
                for alias in node.names:
                    yield node.lineno, f"maps.{alias.name}"
            elif node.module.startswith("maps."):
                yield node.lineno, node.module


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYERS), f"place these in LAYERS and the README: {sorted(units - set(LAYERS))}"


def test_no_import_goes_back_up():
    back = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _unit(_module_name(path))
        for line, target in _imports(path):
            other = _unit(target)
            if other != me and LAYERS.get(other, 0) > LAYERS[me]:
                back.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} imports {target}")
    assert not back, "imports against the flow:\n" + "\n".join(back)


def _graph():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        graph[name] = {t for _, t in _imports(path)}
    return graph


def test_no_import_circle_between_modules():
    graph = _graph()
    modules = set(graph)

    def resolve(target):
        # `from maps.launch import x` reads the package's __init__, which imports its modules
        return target if target in modules else None

    seen, stack, cycles = set(), [], []

    def visit(node, on_path):
        if node in on_path:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_path.add(node)
        stack.append(node)
        for t in sorted(graph.get(node, ())):
            t = resolve(t)
            # a package's __init__ re-exports its own modules: that is not a circle
            if t and t != node and not (node.startswith(t + ".") or t.startswith(node + ".")):
                visit(t, on_path)
        stack.pop()
        on_path.discard(node)

    for m in sorted(modules):
        visit(m, set())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


@pytest.mark.parametrize("name", ["testing", "sweep_testing", "launch", "sweep", "runstore"])
def test_no_flat_suite_modules_left(name):
    assert not (PACKAGE / f"{name}.py").exists()
