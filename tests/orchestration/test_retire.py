"""`cmoe retire` through the real flows: two tasks learned, one retirement rejected by the gate, one approved.

A rejected retirement changes nothing: the champion stays and keeps the task's evaluation set. An
approved one becomes the champion without the task, and the task's evaluation set is deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmoe.config import load_config
from cmoe.registry import Registry

from .conftest import tiny_config_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


@dataclass
class Retired:
    registry: Registry
    config: str
    names: list[str]
    rejected: object  # TaskOutcome of retiring task 2 under a gate that refuses it
    approved_output: str  # what `cmoe retire <task 1>` printed


@pytest.fixture(scope="module")
def retired(suite: list[Path], base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Retired:
    from typer.testing import CliRunner

    from cmoe.cli import app
    from flows.continual import continual_task
    from flows.retire import retire_task

    folder = tmp_path_factory.mktemp("retire")
    config = tiny_config_file(folder, base_dir, "auto")
    # same home, a gate that rejects: the retirement must remove more than any model holds
    strict = tiny_config_file(folder, base_dir, "strict", max_params_added=-10**12)
    names = [continual_task(str(bundle), config).task for bundle in suite]
    rejected = retire_task(names[1], strict)
    result = CliRunner().invoke(app, ["retire", names[0], "--config", config])
    assert result.exit_code == 0, result.output
    return Retired(Registry(load_config(config)), config, names, rejected, result.output)


def test_a_rejected_retirement_leaves_the_champion_and_its_evaluation_sets(retired: Retired) -> None:
    assert retired.rejected.decision == "rejected" and "params added -" in retired.rejected.reason
    rejected = retired.registry.version(retired.rejected.version)
    assert rejected.retired == retired.names[1] and rejected.parent_version == 2 and rejected.removed is None
    assert Path(retired.registry.version(2).eval_set["uri"]).is_file()


def test_an_approved_retirement_is_the_champion_without_the_task_and_its_evaluation_set_is_gone(
        retired: Retired, cli: Callable[..., str]) -> None:
    from cmoe.model.state import read_manifest
    from cmoe.registry import held_versions

    registry, (first, second) = retired.registry, retired.names
    champion = registry.champion()
    info = registry.version(champion.version)
    assert f"retire {first}: approved (v{champion.version}) by gate" in retired.approved_output
    assert (info.task, info.retired, info.parent_version) == (first, first, 2)
    assert set(info.acc) == {second} and info.metrics["params_added"] < 0
    assert read_manifest(champion.state_dir)["tasks"] == [second]
    assert [v.task for v in held_versions(registry.lineage(champion.version))] == [second]
    gone, kept = registry.version(1).eval_set["uri"], registry.version(2).eval_set["uri"]
    assert not Path(gone).exists() and Path(kept).is_file()
    assert info.removed == [gone]
    # asked again: the approved retirement is found in the lineage, and nothing more is done
    assert f"retire {first}: approved (v{champion.version})" in cli("retire", first, "--config", retired.config)
    assert registry.champion().version == champion.version
