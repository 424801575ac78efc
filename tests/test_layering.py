"""Imports point down the layers of docs/architecture.md, and MLflow and Prefect stay in their own layers.

data < model < stages < registry < flows < cli; the foundation modules (config, env, files, net, redact)
sit below them all and import none. The registry is the only MLflow code; Prefect is imported
by the flows and the CLI only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import ROOT, imported_modules

ORDER = ("cmoe.data", "cmoe.model", "cmoe.stages", "cmoe.registry", "flows", "cmoe.cli")  # bottom to top
FOUNDATION = ("cmoe.config", "cmoe.env", "cmoe.files", "cmoe.net", "cmoe.redact")
THIRD_PARTY = {"cmoe.data": ("prefect", "mlflow"), "cmoe.model": ("prefect", "mlflow"),
               "cmoe.stages": ("prefect", "mlflow"), "cmoe.registry": ("prefect",)}


def crossings(module: str, banned: tuple[str, ...]) -> list[str]:
    """`file: imported module` for every import of a banned module (or one inside it) in `module`'s sources."""
    path = ROOT / module.replace(".", "/")
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return [f"{f.relative_to(ROOT)}: {name}" for f in files for name in sorted(imported_modules(f))
            if any(name == bad or name.startswith(bad + ".") for bad in banned)]


@pytest.mark.parametrize("layer", ORDER[:-1])
def test_layer_imports_nothing_above_it(layer: str) -> None:
    above = ORDER[ORDER.index(layer) + 1:] + THIRD_PARTY.get(layer, ())
    assert not crossings(layer, above), "imports crossing the layers"


@pytest.mark.parametrize("module", FOUNDATION)
def test_foundation_modules_import_no_layer(module: str) -> None:
    assert not crossings(module, ORDER), "a foundation module imports a layer"
