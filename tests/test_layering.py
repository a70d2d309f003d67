"""The import rule: every module imports only its own layer or lower ones, and no two modules import each other.

Data flows one way (sources -> decode -> hash/embed -> dedup -> cluster/retrieve -> shards | loader -> augment ->
model -> loss -> optimizer), and the packages are layered the same way. Imports inside functions count too: a lazy
import hides a cycle from Python, not from a reader. ``__main__`` modules are entry points and sit above everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the longest prefix listed; data_pipeline sits above all of dinov2 (it embeds with
# dinov2 backbones and submits through dinov2.run.slurm), and dinov2 never imports data_pipeline.
LAYERS: list[tuple[str, ...]] = [
    ("dinov2.io",),
    ("dinov2.config",),
    ("dinov2.data",),
    ("dinov2.layers",),
    ("dinov2.loss",),
    ("dinov2.models",),
    ("dinov2.weights",),
    ("dinov2.eval", "dinov2.hub"),
    ("dinov2.distributed",),
    ("dinov2.train",),
    ("dinov2.run",),
    ("data_pipeline.core",),
    ("data_pipeline.ingest",),
    ("data_pipeline.embed",),
    ("data_pipeline.dedup",),
    ("data_pipeline.cluster",),
    ("data_pipeline.output",),
    ("data_pipeline.curate",),
]
PACKAGES = ("dinov2", "data_pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (``from pkg import sub`` names ``pkg.sub``)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where c is an attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in project_modules() if m not in PACKAGES and layer_of(m) < 0]
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_no_import_from_a_higher_layer() -> None:
    violations = []
    for name, targets in import_graph().items():
        if name.endswith("__main__") or name in PACKAGES:
            continue
        for target in targets:
            if target in PACKAGES:
                continue
            if layer_of(target) > layer_of(name):
                violations.append(f"{name} (layer {LAYERS[layer_of(name)][0]}) imports {target}")
    assert not violations, "\n".join(sorted(violations))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    # A package's __init__ re-exporting its own modules is not a cycle of meaning; drop package -> child edges.
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
])
def test_cycle_finder(graph: dict[str, set[str]], cyclic: bool) -> None:
    assert (find_cycle(graph) is not None) == cyclic


def test_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    # The parser resolves `from pkg import module` to the module, which is how most upward imports are written.
    source = tmp_path / "probe.py"
    source.write_text("from dinov2.train import optim\nimport dinov2.models.registry\n")
    found = imported_modules(source, "dinov2.loss.probe", set(project_modules()))
    assert found == {"dinov2.train.optim", "dinov2.models.registry"}
    assert layer_of("dinov2.train.optim") > layer_of("dinov2.loss.probe")
