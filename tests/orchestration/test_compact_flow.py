"""`cmoe compact` through the real flow, on a copy of the watcher's two-task lineage: a candidate with
fewer experts, decided by the gate; the champion moves only when the gate approves."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from cmoe.config import load_config
from cmoe.registry import Registry

from .conftest import tiny_config_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def _experts(state: Path) -> int:
    from cmoe.model.state import read_manifest

    return sum(len(origins) for origins in read_manifest(state)["experts"].values())


def test_a_compaction_is_a_candidate_with_fewer_experts_that_the_gate_decides(
        watched, base_dir: Path, tmp_path: Path, cli: Callable[..., str]) -> None:  # noqa: ANN001
    from cmoe.registry import held_versions

    # a copy of the session's lineage: its own registry, so the watcher's versions stay as they are
    home = Path(load_config(watched[0]).home)
    shutil.copytree(home, tmp_path / "home", ignore=shutil.ignore_patterns("prefect"))
    strict = tiny_config_file(tmp_path, base_dir, "strict", max_params_added=-10**12)  # removes more than any holds
    registry = Registry(load_config(strict))
    champion = registry.champion()
    before = _experts(champion.state_dir)

    rejected = cli("compact", "--config", strict)
    assert "compact: rejected (v3) by gate" in rejected and "params added" in rejected
    assert registry.champion().version == champion.version

    # every task expert counts as unused and any drop is allowed (other compact settings: new work)
    approving = Path(tiny_config_file(tmp_path, base_dir, "approving"))
    settings = yaml.safe_load(approving.read_text())
    settings["compact"].update(min_use=1.0, max_drop=100.0)
    approving.write_text(yaml.safe_dump(settings))
    assert "compact: approved (v4) by gate" in cli("compact", "--config", str(approving))
    info, now = registry.version(4), registry.champion()
    assert now.version == 4 and info.parent_version == champion.version and info.metrics["params_added"] < 0
    assert _experts(now.state_dir) < before and set(info.acc) == set(champion.acc)
    assert [v.version for v in held_versions(registry.lineage(4))] == [1, 2]  # it learned no task
