"""The champion served by MLflow's own scoring server, in an environment without the project installed.

`mlflow models serve -m models:/cmoe@champion --env-manager local` runs in a fresh virtual
environment that holds only the version's logged requirements and what they depend on (linked
from this environment: no index is reachable here), never cmoe: the pyfunc's code comes from the
version's `code/` folder. Requests are posted as a user would (image = base64 PNG); a request
with a row `cmoe predict` would refuse is answered 400, naming the row, and a model whose shipped
code was changed refuses to load.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import venv
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pytest
from mlflow.exceptions import MlflowException
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cmoe.config import load_config
from cmoe.net import free_port
from cmoe.registry import Registry
from cmoe.registry.trusted_code import model_code_problem
from tests.data.helpers import header_only_png
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


def post(url: str, rows: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    """POST rows to /invocations in MLflow's `dataframe_split` format; the HTTP status and JSON body."""
    body = json.dumps({"dataframe_split": {"columns": ["image", "question"], "data": [list(r) for r in rows]}})
    request = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - the local test server
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def invoke(url: str, rows: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The predictions for rows posted to /invocations (which must answer 200)."""
    status, body = post(url, rows)
    assert status == 200, body
    return body["predictions"]


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


def refusal(url: str, rows: list[tuple[str, str]]) -> str:
    """The pyfunc's error for a request the server must refuse as bad input (HTTP 400), without the
    shortened copy of the request MLflow puts in front of it."""
    status, body = post(url, rows)
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", (status, body)
    data, error = body["message"].rsplit("\nError: ", 1)
    assert data.startswith("Failed to predict data ")
    return error


def test_rows_the_validator_would_refuse_get_a_400_naming_each_and_a_good_request_still_answers(
        served: str, suite: list[Path]) -> None:
    """The pyfunc applies `cmoe predict`'s image and text limits itself: nothing of the request is answered."""
    (image, question), = rows_of(suite[0], 1)
    bomb = base64.b64encode(header_only_png(60000, 60000)).decode()  # 60 bytes claiming 3.6 Gpx
    text = base64.b64encode(b"not an image\n").decode()
    message = refusal(served, [(bomb, question), (image, question), (text, question), (image, "why " * 25_000)])
    assert message.startswith("3 of 4 rows cannot be answered, so none was: row 0: image: possible decompression bomb")
    assert "; row 2: image: cannot decode image: not an image in a supported format" in message
    assert message.endswith("; row 3: question: the question is 100000 characters, over the 2000 limit")
    assert "row 1" not in message
    assert len(invoke(served, [(image, question)])) == 1


def test_a_question_whose_prompt_exceeds_the_models_positions_gets_a_400(served: str, suite: list[Path]) -> None:
    """Under the character limit but over the model's positions: refused, not answered with garbage."""
    (image, question), = rows_of(suite[0], 1)
    long = " ".join(f"w{i}" for i in range(400))  # 1 900 characters: within the text limit, ~800 tokens
    message = refusal(served, [(image, question), (image, long)])
    assert message.startswith("1 of 2 rows cannot be answered, so none was: row 1: question: too long for the model")
    assert message.endswith("over the model's 256 positions")


def test_a_version_whose_shipped_code_was_changed_refuses_to_load(champion_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The pyfunc checks its model's shipped code against the sha256 recorded when it was logged as
    MLflow loads it (the served copy runs the same check on itself: `served` starts only because it
    passes there), and a check before loading finds the same."""
    changed = Path(shutil.copytree(champion_dir, tmp_path / "model"))
    with (changed / "code" / "cmoe" / "stages" / "predict.py").open("a") as f:
        f.write("raise SystemExit('changed code ran')\n")
    expected = ("its shipped code is not what was logged (sha256 recorded in its MLmodel): "
                "code/cmoe/stages/predict.py changed")
    assert model_code_problem(changed) == expected
    monkeypatch.setattr(sys, "path", list(sys.path))  # MLflow prepends the model's code folder
    with pytest.raises(MlflowException, match=re.escape(f"refusing to load this cmoe model: {expected}")):
        mlflow.pyfunc.load_model(str(changed))
