"""The package's layout holds: no import circles, and no import from a lower layer up to a higher one.

Every ``ppframework`` import counts, including those inside functions and under ``TYPE_CHECKING``.
``LAYERS`` is the map in docs/architecture.md; a new top-level module or package must be placed in it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import ppframework

PACKAGE = Path(ppframework.__file__).parent

#: Lowest first; a component may import its own layer and those below (never a circle).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "types", "positions", "devices", "formatting", "plotting", "outputs")),
    ("state", ("history", "decoding", "data", "adapters")),
    ("contracts", ("hookspecs", "validation", "config", "metrics", "zeroshot")),
    ("parts", ("strategies", "models", "harness", "registry")),
    ("engine", ("pipeline", "calibration", "testing", "ablation", "plugin_listing")),
    ("assembly", ("api", "preflight")),
    ("protocols", ("runner", "generation", "evaluate", "lm_eval_tasks", "sweep", "export")),
    ("entry", ("cli", "__init__")),
]
LAYER_OF = {component: rank for rank, (_, members) in enumerate(LAYERS) for component in members}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``ppframework`` modules ``name`` imports anywhere in its file (resolved to known modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            named = [f"{module}.{alias.name}" for alias in node.names]
            targets = [full if full in known else module for full in named]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("ppframework") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_in_a_circle() -> None:
    assert _cycles(_graph()) == []


def test_every_component_has_a_layer() -> None:
    components = {_component(m) for m in _modules()}
    assert sorted(components - set(LAYER_OF)) == [], "place new top-level modules in LAYERS"


def test_no_import_climbs_to_a_higher_layer() -> None:
    climbs = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if LAYER_OF.get(_component(target), -1) > LAYER_OF.get(_component(module), -1)
    ]
    assert climbs == []


def test_components_import_each_other_in_no_circle() -> None:
    between: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            if _component(target) != _component(module):
                between[_component(module)].add(_component(target))
    assert _cycles(between) == []


def test_the_checks_see_a_climb_and_a_circle() -> None:
    """The helpers would report a circle and a climb (so the tests above can fail)."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert LAYER_OF["cli"] > LAYER_OF["pipeline"] > LAYER_OF["adapters"]
    assert "ppframework.pipeline" in _graph()["ppframework.api"]
