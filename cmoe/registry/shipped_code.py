"""The cmoe package shipped inside every registered version, so MLflow's own tools can serve it.

`mlflow models serve -m models:/cmoe@champion` (or `build-docker`) restores a version's environment
from its requirements, then imports the version's code from its `code/` folder (MLflow
`code_paths`, prepended to `sys.path`). The pyfunc needs the cmoe package, which no package index
has: its source travels with the model, and the requirements list only the third-party
distributions that code imports, pinned as installed here. A process that has imported cmoe
already (`cmoe predict`, the flows) keeps running its installed cmoe: a package in `sys.modules`
is never looked up on `sys.path` again, so there the shipped copy is inert.

The sha256 of every file shipped is recorded in the version's MLmodel (metadata `cmoe_code_sha256`),
taken from the very copy MLflow logs, and checked before loading and by the served pyfunc itself:
a shipped file changed, added or removed afterwards makes the version refuse to load.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from cmoe.files import file_sha256

PACKAGE = Path(__file__).resolve().parents[1]  # the installed cmoe package (MLflow copies it without __pycache__)
CODE_SHA256 = "cmoe_code_sha256"  # MLmodel metadata key: {path inside the package: sha256} of every file shipped
PYTHON_CACHE = "__pycache__"  # bytecode Python writes beside the modules it imports: never shipped
# What the served code imports: the pyfunc, cmoe.stages.predict and the config, data, model and
# registry modules they load (PIL is pillow, yaml is pyyaml; botocore comes with boto3).
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pandas",
                        "pyarrow", "pydantic", "pyyaml", "datasets", "boto3")


def pip_requirements() -> list[str]:
    """`dist==version` of each serving requirement as installed here; a local label (torch's `+cpu`)
    is dropped, so any index resolves the pin (and `torch==2.13.0` still matches `2.13.0+cpu`)."""
    return [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in SERVING_REQUIREMENTS]  # PEP 440


@contextmanager
def package_to_ship() -> Iterator[tuple[Path, dict[str, str | None]]]:
    """A private copy of the installed package, as MLflow would copy it (without __pycache__), and the
    sha256 of each of its files: the record is of the bytes logged, even if the installed tree changes."""
    with tempfile.TemporaryDirectory(prefix="cmoe-code-") as tmp:
        copy = Path(shutil.copytree(PACKAGE, Path(tmp) / PACKAGE.name, ignore=shutil.ignore_patterns(PYTHON_CACHE)))
        yield copy, _package_files(copy, skip_cache=True)  # copytree follows links: only files here


def shipped_code_problem(model_dir: Path, code: str, recorded: Any, *, running: bool = False) -> str | None:
    """Why the code folder `code` (the MLmodel's) of the model in `model_dir` could make a loading
    process run more than the cmoe package it was logged with, or None. `recorded` is the MLmodel's
    `cmoe_code_sha256`; `running`: the check runs inside that code (a served pyfunc's load_context),
    so the bytecode Python cached while importing it is expected there.

    Anything beside `cmoe/` would be found on `sys.path` before the installed modules of that name.
    """
    code_dir = model_dir / code
    if not code_dir.resolve().is_relative_to(model_dir.resolve()):
        return f"its code folder {code!r} lies outside the model"
    found = sorted(p.name for p in code_dir.iterdir()) if code_dir.is_dir() else None
    package = code_dir / PACKAGE.name
    if found != [PACKAGE.name] or package.is_symlink() or not package.is_dir():
        return f"its code folder holds {found!r}, not only the {PACKAGE.name!r} package every version ships"
    if not isinstance(recorded, dict) or not recorded:
        return (f"its MLmodel records no sha256 of its shipped code (metadata {CODE_SHA256!r}): it was logged "
                "before cmoe recorded them, or the record was removed")
    shipped = _package_files(package, skip_cache=running)
    differ = sorted(name for name in recorded.keys() | shipped.keys()
                    if shipped.get(name) is None or shipped[name] != recorded.get(name))
    if differ:
        what = [f"{code}/{PACKAGE.name}/{name} " + _difference(name, recorded, shipped) for name in differ[:3]]
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        return f"its shipped code is not what was logged (sha256 recorded in its MLmodel): {', '.join(what)}{more}"
    return None


def _difference(name: str, recorded: dict, shipped: dict[str, str | None]) -> str:
    """How the shipped file `name` differs from what was recorded at logging."""
    if name not in shipped:
        return "removed"
    if shipped[name] is None:
        return "is not a regular file"
    return "added" if name not in recorded else "changed"


def _package_files(package: Path, *, skip_cache: bool) -> dict[str, str | None]:
    """{path inside `package`: sha256} of each of its files, None for anything else but a folder (a
    link is never followed); Python's bytecode cache folders left out when `skip_cache`."""
    files: dict[str, str | None] = {}
    for path in sorted(package.rglob("*")):
        inside = path.relative_to(package)
        if (skip_cache and PYTHON_CACHE in inside.parts) or (path.is_dir() and not path.is_symlink()):
            continue
        files[inside.as_posix()] = file_sha256(path) if path.is_file() and not path.is_symlink() else None
    return files
