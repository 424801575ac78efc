"""Models-from-code runs code from the artifact store: a version is loaded only if that code is ours.

A version's pyfunc is rebuilt, not unpickled, by MLflow executing the version's own copy of
`model_code.py` (which imports the installed `cmoe` package). Whoever can write the artifact store
could change that copy, put code beside the shipped cmoe package (cmoe.registry.shipped_code: MLflow
prepends that folder to `sys.path`), log a pickled python_model instead, or point an artifact
outside the model; `model_code_problem` refuses each before MLflow loads anything.

The served pyfunc runs the same check on itself when MLflow loads it (`CmoePyfunc.load_context`,
then against its own shipped copy of `model_code.py`): a shipped file that is not the one logged
makes the model refuse to load. That is integrity, not a defence: the check runs inside the code
it checks and its record lies in the same artifact store, so whoever rewrites both passes it.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.models import Model

from cmoe.files import file_sha256
from cmoe.registry.shipped_code import CODE_SHA256, shipped_code_problem

MODEL_CODE = Path(__file__).with_name("model_code.py")  # the installed entry point, logged with every version
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader of models-from-code


def model_code_problem(model_dir: Path, *, running: bool = False) -> str | None:
    """Why the downloaded model in `model_dir` must not be loaded by this installation, or None;
    `running`: asked by the model's own pyfunc as it loads (cmoe.registry.shipped_code)."""
    try:
        model = Model.load(str(model_dir))
        flavor = model.flavors["python_function"]
    except (OSError, KeyError, ValueError) as err:
        return f"its MLmodel has no readable python_function flavor ({type(err).__name__}: {str(err)[:200]})"
    if flavor.get("loader_module") != CODE_LOADER or not flavor.get("model_code_path"):
        return "it is not a models-from-code pyfunc (loading it would unpickle its python_model)"
    code = model_dir / Path(flavor["model_code_path"]).name  # where MLflow reads it from
    if not code.is_file():
        return f"its model code {code.name} is missing"
    logged, installed = file_sha256(code), file_sha256(MODEL_CODE)
    if logged != installed:
        return (f"its model code {code.name} (sha256 {logged[:16]}…) differs from the installed "
                f"{MODEL_CODE} ({installed[:16]}…): it would run code this cmoe does not ship")
    recorded = (model.metadata or {}).get(CODE_SHA256)
    if flavor.get("code") and (problem := shipped_code_problem(model_dir, flavor["code"], recorded, running=running)):
        return problem
    for name, artifact in (flavor.get("artifacts") or {}).items():
        if not (model_dir / artifact.get("path", "")).resolve().is_relative_to(model_dir.resolve()):
            return f"its artifact {name!r} lies outside the model ({artifact.get('path')!r})"
    return None
