"""Every third-party module the code imports comes from a declared distribution: the packages from the main
dependencies (a plain ``pip install`` runs every CLI and stage), tests, demo and benches from the extras too."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

REPO = Path(__file__).resolve().parents[1]
OWN = {"dinov2", "data_pipeline", "demo", "bench", "tests", "hubconf", "__future__"}
# Imported only behind a guard, with a fallback when absent: the gpu extra.
OPTIONAL = {"xformers"}


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:  # "torch>=2.6,<3" -> "torch"
        return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower().replace("_", "-") for r in reqs}

    extras = set().union(*(names(reqs) for reqs in project["optional-dependencies"].values()))
    return names(project["dependencies"]), extras


def _imports(paths: list[Path]) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - OWN - set(sys.stdlib_module_names)


def _undeclared(modules: set[str], declared: set[str]) -> list[str]:
    owners = packages_distributions()
    missing = []
    for module in sorted(modules - OPTIONAL):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (from {', '.join(sorted(dists))})")
    return missing


@pytest.mark.parametrize(("folders", "with_extras"), [
    (("dinov2", "data_pipeline"), False),
    (("tests", "demo", "bench"), True),
])
def test_every_import_is_declared(folders: tuple[str, ...], with_extras: bool) -> None:
    main, extras = _declared()
    paths = [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]
    assert paths
    assert _undeclared(_imports(paths), main | extras if with_extras else main) == []
