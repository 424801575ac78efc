"""The cmoe package shipped inside every registered version, so MLflow's own tools can serve it.

`mlflow models serve -m models:/cmoe@champion` (or `build-docker`) restores a version's environment
from its requirements, then imports the version's code from its `code/` folder (MLflow
`code_paths`, prepended to `sys.path`). The pyfunc needs the cmoe package, which no package index
has: its source travels with the model, and the requirements list only the third-party
distributions that code imports, pinned as installed here. A process that has imported cmoe
already (`cmoe predict`, the flows) keeps running its installed cmoe: a package in `sys.modules`
is never looked up on `sys.path` again, so there the shipped copy is inert.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the installed cmoe package (MLflow copies it without __pycache__)
# What the served code imports: the pyfunc, cmoe.stages.predict and the config, data, model and
# registry modules they load (PIL is pillow, yaml is pyyaml; botocore comes with boto3).
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pandas",
                        "pyarrow", "pydantic", "pyyaml", "datasets", "boto3")


def pip_requirements() -> list[str]:
    """`dist==version` of each serving requirement as installed here; a local label (torch's `+cpu`)
    is dropped, so any index resolves the pin (and `torch==2.13.0` still matches `2.13.0+cpu`)."""
    return [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in SERVING_REQUIREMENTS]  # PEP 440


def shipped_code_problem(model_dir: Path, code: str) -> str | None:
    """Why the code folder `code` (the MLmodel's) of the model in `model_dir` could make a loading
    process run more than the cmoe package, or None.

    Anything beside `cmoe/` would be found on `sys.path` before the installed modules of that name.
    """
    code_dir = model_dir / code
    if not code_dir.resolve().is_relative_to(model_dir.resolve()):
        return f"its code folder {code!r} lies outside the model"
    found = sorted(p.name for p in code_dir.iterdir()) if code_dir.is_dir() else None
    package = code_dir / PACKAGE.name
    if found != [PACKAGE.name] or package.is_symlink() or not package.is_dir():
        return f"its code folder holds {found!r}, not only the {PACKAGE.name!r} package every version ships"
    return None
