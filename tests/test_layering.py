"""Imports point down the layers of ARCHITECTURE.md: data < model < stages; none imports Prefect or MLflow."""

from __future__ import annotations

import subprocess
import sys

import pytest

LAYERS = {
    "cmoe.data": ("cmoe.model", "cmoe.stages", "prefect", "mlflow"),
    "cmoe.model": ("cmoe.stages", "prefect", "mlflow"),
    "cmoe.stages": ("prefect", "mlflow"),
}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_layer_imports_nothing_above_it(package: str) -> None:
    check = f"""
import importlib, pkgutil, sys
import {package} as pkg
for m in pkgutil.iter_modules(pkg.__path__, "{package}."):
    importlib.import_module(m.name)
print(sorted(n for n in sys.modules if n.startswith({LAYERS[package]!r})))
"""
    # A fresh interpreter: in this one, other tests may already have imported those packages.
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
