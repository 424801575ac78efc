"""Compact stage on the session's two-task lineage (task 1: two experts in layer 0, task 2: one in layer 1):
unused experts are retired and similar ones merged on the kept evaluation sets, the new state loads
and records it, and a full layer is compacted before it grows."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Lineage


def _compact(lineage: Lineage, tmp: Path, **compact: float):  # noqa: ANN202 - CompactResult
    from cmoe.stages.compact import run_compact

    cfg = lineage.cfg.model_copy(update={"compact": lineage.cfg.compact.model_copy(update=compact)})
    return run_compact(cfg, lineage.state(1), tmp / "compact")


@pytest.fixture(scope="module")
def retired(lineage: Lineage, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Every task expert counts as unused (min_use 1) and any drop is allowed: all three go."""
    return _compact(lineage, tmp_path_factory.mktemp("retire-all"), min_use=1.0, merge_similarity=1.0, max_drop=100.0)


@pytest.fixture(scope="module")
def merged(lineage: Lineage, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """No expert is unused at 0, every pair is similar enough: task 1's two experts in layer 0 merge."""
    return _compact(lineage, tmp_path_factory.mktemp("merge-all"), min_use=0.0, merge_similarity=-1.0, max_drop=100.0)


def test_unused_experts_are_retired_and_the_state_loads_without_them(retired) -> None:  # noqa: ANN001
    from cmoe.model.cmoe_layer import cmoe_layers
    from cmoe.model.state import load_state, read_manifest

    assert (retired.experts_before, retired.experts_after) == ({"0": 4, "1": 3}, {"0": 2, "1": 2})
    assert retired.retired == 3 and retired.merged == 0 and retired.params_added < 0
    model = load_state(retired.state_dir)
    assert [len(layer.experts) for layer in cmoe_layers(model).values()] == [2, 2]
    [entry] = read_manifest(Path(retired.state_dir))["compactions"]
    assert sorted((s["kind"], s["layer"]) for s in entry["steps"]) == [("retire", 0), ("retire", 0), ("retire", 1)]


def test_similar_experts_merge_into_one_of_the_earlier_task(merged) -> None:  # noqa: ANN001
    from cmoe.model.state import read_manifest

    merges = [s for s in merged.steps if s["kind"] == "merge" and s["outcome"] == "kept"]
    assert [(s["layer"], s["experts"]) for s in merges] == [(0, [2, 3])]
    assert merged.experts_after == {"0": 3, "1": 3}
    manifest = read_manifest(Path(merged.state_dir))
    assert manifest["experts"]["0"] == ["base", "base", manifest["tasks"][0]]


def test_a_step_that_drops_a_task_past_the_limit_is_refused(lineage: Lineage, tmp_path: Path) -> None:
    from cmoe.model.cmoe_layer import cmoe_layers
    from cmoe.model.state import load_state

    strict = _compact(lineage, tmp_path, min_use=1.0, merge_similarity=1.0, max_drop=0.0)
    assert all((s["outcome"] == "kept") == (s["drop"] <= 0.0) for s in strict.steps)
    assert all(strict.acc_after[t] >= strict.acc_before[t] for t in strict.acc_before)
    kept = sum(s["outcome"] == "kept" for s in strict.steps)
    assert sum(len(x.experts) for x in cmoe_layers(load_state(strict.state_dir)).values()) == 7 - kept


def test_a_full_layer_is_compacted_before_it_grows(lineage: Lineage, tmp_path: Path) -> None:
    from cmoe.model.cmoe_layer import cmoe_layers
    from cmoe.model.state import load_state
    from cmoe.stages.compact import cap_plan, room, run_make_room

    cfg = lineage.cfg.model_copy(update={
        "moe": lineage.cfg.moe.model_copy(update={"max_experts_per_layer": 4}),  # layer 0 holds 4: full
        "compact": lineage.cfg.compact.model_copy(update={"min_use": 1.0, "max_drop": 100.0})})
    made = run_make_room(cfg, lineage.state(1), tmp_path / "room")
    assert made is not None and made.experts_after == {"0": 3, "1": 3}  # one freed in the full layer only
    free = room(cfg, load_state(made.state_dir))
    assert free == {0: 1, 1: 1} and cap_plan({"0": 2, "1": 1}, free) == {"0": 1, "1": 1}
    assert [len(x.experts) for x in cmoe_layers(load_state(made.state_dir)).values()] == [3, 3]
    roomy = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"max_experts_per_layer": 5})})
    assert run_make_room(roomy, lineage.state(1), tmp_path / "none") is None


def test_the_growth_history_counts_each_merge_and_each_task_expert_it_took(lineage: Lineage, merged) -> None:  # noqa: ANN001
    from cmoe.model.state import read_manifest
    from cmoe.stages.growth import manifest_growth

    first, second = lineage.names
    learned1, learned2, compacted = manifest_growth(read_manifest(Path(merged.state_dir)))
    assert (learned1.task, learned1.added, learned1.experts) == (first, {"0": 2, "1": 0}, {"0": 4, "1": 2})
    assert (learned2.task, learned2.added, learned2.experts) == (second, {"0": 0, "1": 1}, {"0": 4, "1": 3})
    assert (compacted.label, compacted.merged, compacted.retired) == (f"compact after {second}", {"0": 1, "1": 0},
                                                                     {"0": 0, "1": 0})
    assert compacted.experts == merged.experts_after


def test_cmoe_lineage_lists_the_experts_each_task_added_and_a_compaction_retired(
        lineage: Lineage, retired, tmp_path: Path) -> None:  # noqa: ANN001
    import yaml
    from typer.testing import CliRunner

    from cmoe.cli import app
    from cmoe.registry import COMPACTED_TAG, Registry

    cfg = lineage.cfg.model_copy(update={"home": tmp_path / "home"})
    registry = Registry(cfg)
    run = registry.start_task_run("compacted", "compact", "", None, {})
    version = registry.register_candidate(run, Path(retired.state_dir), key="compacted", task="compact", bundle_uri="",
                                          bundle_sha256="", parent_version=None, acc={}, metrics={}, gate={},
                                          tags={COMPACTED_TAG: '{"retired": 3, "merged": 0}'})
    config = tmp_path / "cmoe.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["lineage", str(version), "--config", str(config)])
    assert result.exit_code == 0, result.output
    first, second = lineage.names
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[3:-1]]
            for line in result.stdout.splitlines() if line.count("│") == 9}  # version, after, 2 layers, 3 totals, delta
    # layer 0, layer 1, added, merged, retired, delta (none: this lineage grew experts)
    assert rows[first] == ["4 (+2)", "2", "2", "0", "0", ""] and rows[second] == ["4", "3 (+1)", "1", "0", "0", ""]
    assert rows[f"compact after {second}"] == ["2 (2 retired)", "2 (1 retired)", "0", "0", "3", ""]


def test_cli_compact_of_a_state_prints_each_tasks_accuracy_and_writes_every_step(lineage: Lineage,
                                                                                 tmp_path: Path) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from cmoe.cli import app

    cfg = lineage.cfg.model_copy(update={"compact": lineage.cfg.compact.model_copy(
        update={"min_use": 1.0, "merge_similarity": 1.0, "max_drop": 100.0})})
    config = tmp_path / "cmoe.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compact", "--state", str(lineage.state(1)), "--out", str(out),
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "compact.json").read_text())
    assert written["retired"] == 3 and len(written["steps"]) == 3
    for task in lineage.names:
        assert f"{task}: {written['acc_before'][task]:.1f} -> {written['acc_after'][task]:.1f} %" in result.stdout
    # task 1 added two experts to layer 0 and task 2 one to layer 1: a pair only in layer 0
    assert written["nearest"]["0"]["most_similar"] is not None and written["nearest"]["1"]["most_similar"] is None
    assert f"layer 0: least-used task expert {written['nearest']['0']['least_use']:.3f}" in result.stdout
