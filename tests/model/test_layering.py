"""The model layer must not import the stages, Prefect or MLflow."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("cmoe.stages", "prefect", "mlflow")

CHECK = f"""
import importlib, pkgutil, sys
import cmoe.model
for m in pkgutil.iter_modules(cmoe.model.__path__, "cmoe.model."):
    importlib.import_module(m.name)
print(sorted(n for n in sys.modules if n.startswith({FORBIDDEN!r})))
"""


def test_model_layer_imports_nothing_above_it() -> None:
    # A fresh interpreter: in this one, other tests may already have imported those packages.
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
