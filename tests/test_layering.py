"""Imports point down the layers of docs/architecture.md: data < model < stages; none imports Prefect or MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import imported_modules

import cmoe

LAYERS = {
    "data": ("cmoe.model", "cmoe.stages", "prefect", "mlflow"),
    "model": ("cmoe.stages", "prefect", "mlflow"),
    "stages": ("prefect", "mlflow"),
}


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
