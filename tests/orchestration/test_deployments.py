"""prefect.yaml names real flows with their real parameters; the watcher is scheduled; one run at a time."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[2]


def test_deployments_point_at_the_flows() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"watch-inbox", "continual-task"}
    for name, d in deployments.items():
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        assert flow.name == name
        assert set(d.get("parameters", {})) <= set(inspect.signature(flow.fn).parameters)
        assert d["work_pool"]["name"] == "cmoe" and d["concurrency_limit"] == 1
    assert deployments["watch-inbox"]["schedules"][0]["interval"] > 0
