"""`cmoe compact` through the real flow, on a copy of a two-task lineage that grew experts: a candidate
with fewer experts, decided by the gate; the champion moves only when the gate approves."""

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


@pytest.fixture(scope="module")
def grew_experts(prefect_api: None, suite: list[Path], s3_endpoint: str, base_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> str:
    """The watcher's two tasks learned again, grown as new experts (`expand.growth: experts`, what
    compaction removes; the default delta adds none); its config."""
    from cmoe.data.storage import s3_client, upload_bundle
    from flows.watch import watch_inbox

    s3_client().create_bucket(Bucket="inbox-experts")
    for bundle in suite:
        upload_bundle(bundle, f"s3://inbox-experts/new/{bundle.name}/")
    config = tiny_config_file(tmp_path_factory.mktemp("experts"), base_dir, "auto", inbox="s3://inbox-experts/new/",
                              growth="experts")
    assert [o.decision for o in watch_inbox(config)] == ["approved", "approved"]
    return config


def test_a_compaction_is_a_candidate_with_fewer_experts_that_the_gate_decides(
        grew_experts: str, base_dir: Path, tmp_path: Path, cli: Callable[..., str]) -> None:
    from cmoe.registry import held_versions

    # a copy of that lineage: its own registry, so its versions stay as they are
    home = Path(load_config(grew_experts).home)
    shutil.copytree(home, tmp_path / "home", ignore=shutil.ignore_patterns("prefect"))
    strict = tiny_config_file(tmp_path, base_dir, "strict", growth="experts", max_params_added=-10**12)  # removes more than any holds
    registry = Registry(load_config(strict))
    champion = registry.champion()
    before = _experts(champion.state_dir)

    rejected = cli("compact", "--config", strict)
    assert "compact: rejected (v3) by gate" in rejected and "params added" in rejected
    assert registry.champion().version == champion.version

    # every task expert counts as unused and any drop is allowed (other compact settings: new work)
    approving = Path(tiny_config_file(tmp_path, base_dir, "approving", growth="experts"))
    settings = yaml.safe_load(approving.read_text())
    settings["compact"].update(min_use=1.0, max_drop=100.0)
    approving.write_text(yaml.safe_dump(settings))
    assert "compact: approved (v4) by gate" in cli("compact", "--config", str(approving))
    info, now = registry.version(4), registry.champion()
    assert now.version == 4 and info.parent_version == champion.version and info.metrics["params_added"] < 0
    assert _experts(now.state_dir) < before and set(info.acc) == set(champion.acc)
    assert [v.version for v in held_versions(registry.lineage(4))] == [1, 2]  # it learned no task
