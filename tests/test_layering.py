"""Imports point down the layers of ARCHITECTURE.md: data < model < stages; none imports Prefect or MLflow.

Checked on the source (every import statement, top-level or inside a function), not on
`sys.modules`: third-party packages may load what they like (DeepSpeed itself imports MLflow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cmoe

LAYERS = {
    "data": ("cmoe.model", "cmoe.stages", "prefect", "mlflow"),
    "model": ("cmoe.stages", "prefect", "mlflow"),
    "stages": ("prefect", "mlflow"),
}


def imported_modules(source: Path) -> set[str]:
    """Every module an `import` or `from … import` statement of `source` names."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_nothing_above_it(layer: str) -> None:
    root = Path(cmoe.__file__).parent / layer
    crossing = {
        f"{f.relative_to(root.parent)}: {name}"
        for f in root.rglob("*.py")
        for name in imported_modules(f)
        if any(name == bad or name.startswith(bad + ".") for bad in LAYERS[layer])
    }
    assert not crossing, f"imports crossing the layers: {sorted(crossing)}"
