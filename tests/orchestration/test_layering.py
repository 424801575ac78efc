"""The registry is the only MLflow code and knows nothing of Prefect; the flows hold no ML code."""

from __future__ import annotations

import subprocess
import sys

from import_graph import ROOT, imported_modules


def test_registry_imports_no_prefect() -> None:
    # A fresh interpreter: in this one, other tests may already have imported Prefect.
    check = "import sys, cmoe.registry; print(sorted(n for n in sys.modules if n.startswith('prefect')))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flows_and_cli_reach_mlflow_only_through_the_registry_and_train_nothing() -> None:
    cli = [ROOT / "cmoe" / "cli" / f"{name}.py" for name in ("common", "pipeline", "review", "serve")]
    for path in [*(ROOT / "flows").glob("*.py"), *cli]:
        top = {m.split(".")[0] for m in imported_modules(path)}
        assert not top & {"mlflow", "torch", "deepspeed"}, path
        assert not any(m.startswith("cmoe.model") for m in imported_modules(path)), path


def test_the_doctor_reaches_mlflow_only_through_the_registry() -> None:
    assert not {m for m in imported_modules(ROOT / "cmoe" / "doctor.py") if m.split(".")[0] == "mlflow"}
