"""The champion served by MLflow's own scoring server, in an environment without the project installed.

`mlflow models serve -m models:/cmoe@champion --env-manager local` runs in a fresh virtual
environment that holds only the version's logged requirements and what they depend on (linked
from this environment: no index is reachable here), never cmoe: the pyfunc's code comes from the
version's `code/` folder. Requests are posted as a user would (image = base64 PNG).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import venv
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cmoe.config import load_config
from cmoe.net import free_port
from cmoe.registry import Registry
from cmoe.registry.trusted_code import model_code_problem
from tests.production.conftest import Started, http_ok, start, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
STARTUP_S = 180  # the server imports torch and loads the model before it listens: slow on 2 busy cores
ROWS_PER_TASK = 3


@pytest.fixture(scope="module")
def champion_dir(watched: tuple[str, list[Any], list[Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local copy of the watcher lineage's champion, as MLflow logged it."""
    registry = Registry(load_config(watched[0]))
    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    into = tmp_path_factory.mktemp("champion")
    return Path(mlflow.artifacts.download_artifacts("models:/cmoe@champion", dst_path=str(into)))


def logged_requirements(model_dir: Path) -> list[str]:
    return [line for line in (model_dir / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]


def test_the_champion_ships_the_cmoe_package_and_pins_only_what_an_index_has(champion_dir: Path) -> None:
    """No `cmoe==` pin (no index has cmoe) and no local version label: the package is in `code/`."""
    requirements = logged_requirements(champion_dir)
    names = {canonicalize_name(Requirement(r).name) for r in requirements}
    assert "cmoe" not in names and {"mlflow", "torch", "transformers", "pillow"} <= names
    assert all("+" not in r for r in requirements)  # torch's "+cpu" is no index's version
    assert "cmoe" not in (champion_dir / "conda.yaml").read_text()
    shipped = champion_dir / "code" / "cmoe"
    assert sorted(p.name for p in (champion_dir / "code").iterdir()) == ["cmoe"]
    assert (shipped / "registry" / "pyfunc.py").is_file() and (shipped / "stages" / "predict.py").is_file()
    assert not list(shipped.rglob("__pycache__"))


def test_a_version_with_code_beside_the_cmoe_package_is_refused_before_loading(champion_dir: Path,
                                                                               tmp_path: Path) -> None:
    """The code folder comes first on `sys.path`: a module put beside cmoe would shadow an installed one."""
    assert model_code_problem(champion_dir) is None
    changed = Path(shutil.copytree(champion_dir, tmp_path / "model"))
    (changed / "code" / "pandas.py").write_text("raise SystemExit('shadowed')\n")
    assert model_code_problem(changed) == ("its code folder holds ['cmoe', 'pandas.py'], "
                                           "not only the 'cmoe' package every version ships")


def dependency_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions `requirements` name, and everything they require (extras aside)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r).name for r in requirements]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = metadata.distribution(name)
        for line in found[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def fresh_venv(root: Path, requirements: list[str]) -> Path:
    """A virtual environment with only the distributions of `requirements` (and their dependencies),
    linked from this one's site-packages; its python. Its `uvicorn` is the one `mlflow models serve` runs."""
    venv.EnvBuilder(symlinks=True).create(root)
    site = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for dist in dependency_closure(requirements).values():
        assert dist.files is not None, f"{dist.metadata['Name']} records no files"
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}:
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))
    uvicorn = root / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{root}/bin/python\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return root / "bin" / "python"


@pytest.fixture(scope="module")
def served(watched: tuple[str, list[Any], list[Any]], champion_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow models serve -m models:/cmoe@champion` from a fresh environment on 127.0.0.1; its URL."""
    root = tmp_path_factory.mktemp("serve")
    python = fresh_venv(root / "venv", logged_requirements(champion_dir))
    no_cmoe = subprocess.run([str(python), "-c", "import cmoe"], cwd=root, capture_output=True, text=True)
    assert "No module named 'cmoe'" in no_cmoe.stderr  # the project is not importable there
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{python.parent}:{env['PATH']}", MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
               MLFLOW_REGISTRY_URI=mlflow.get_registry_uri())
    server: Started = start("scoring", [str(python), "-m", "mlflow", "models", "serve", "-m", "models:/cmoe@champion",
                                        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env, root)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), STARTUP_S, "scoring server", server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def rows_of(bundle: Path, n: int) -> list[tuple[str, str]]:
    """The first `n` test rows of a bundle as (base64 PNG, question): what a client posts."""
    rows = [json.loads(line) for line in (bundle / "test" / "metadata.jsonl").read_text().splitlines()[:n]]
    return [(base64.b64encode((bundle / "test" / r["file_name"]).read_bytes()).decode(), r["question"]) for r in rows]


def invoke(url: str, rows: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """POST rows to /invocations in MLflow's `dataframe_split` format; the predictions."""
    body = json.dumps({"dataframe_split": {"columns": ["image", "question"], "data": [list(r) for r in rows]}})
    request = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - the local test server
        return json.loads(response.read())["predictions"]


def test_the_scoring_server_answers_image_and_question_rows(served: str, suite: list[Path]) -> None:
    """Each row gets an answer and the task the locator picked: the served code is the version's own."""
    names = [b.name.split("-", 1)[1] for b in suite]
    out = invoke(served, rows_of(suite[0], ROWS_PER_TASK))
    assert len(out) == ROWS_PER_TASK and all(set(p) == {"answer", "task", "confidence", "margin"} for p in out)
    assert all(isinstance(p["answer"], str) and p["task"] in names and 0.0 <= p["confidence"] <= 1.0 for p in out)


def test_parallel_requests_for_different_tasks_get_the_answers_each_gets_alone(served: str, suite: list[Path]) -> None:
    """Requests of both tasks (of different sizes) at once: each answered as when sent alone."""
    requests = [rows_of(bundle, n) for bundle in suite for n in (1, ROWS_PER_TASK)]
    alone = [invoke(served, rows) for rows in requests]
    assert {p["task"] for out in alone for p in out} == {b.name.split("-", 1)[1] for b in suite}  # both routed to
    with ThreadPoolExecutor(2 * len(requests)) as pool:
        together = list(pool.map(lambda rows: invoke(served, rows), requests * 2))

    def routed(out: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
        return [(p["answer"], p["task"], round(p["confidence"], 4)) for p in out]

    assert [routed(out) for out in together] == [routed(out) for out in alone * 2]
