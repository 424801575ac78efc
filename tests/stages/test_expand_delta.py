"""Expansion with `expand.growth: delta` (the default): a growing task adds its delta in every layer
and no expert, older tasks stay bit-identical, and a task with nothing to grow runs with the delta it
inherits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmoe.model.cmoe_layer import BASE, cmoe_layers
from cmoe.model.state import load_state, read_manifest
from cmoe.stages.common import open_lineage
from cmoe.stages.expand import ExpandResult, expand_model, run_expand
from cmoe.stages.growth import manifest_growth
from cmoe.stages.probe import ProbeReport, run_probe

from .conftest import stage_config
from .test_expand import tensor_sha


@pytest.fixture(scope="module")
def first(suite: list, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Task 1 probed and expanded on the base with the default growth: (cfg, probe, expansion)."""
    root = tmp_path_factory.mktemp("delta-lineage")
    cfg = stage_config(root / "home", base_dir)
    assert cfg.expand.growth == "delta"
    probe = run_probe(cfg, suite[0], None, root / "probe")
    return cfg, probe, run_expand(cfg, suite[0], None, probe, root / "expand")


def test_a_growing_task_adds_its_delta_in_every_layer_and_no_expert(first: tuple) -> None:
    cfg, probe, expanded = first
    state = Path(expanded.state_dir)
    manifest = read_manifest(state)
    assert probe.growth == "delta" and set(probe.plan) == set(manifest["experts"])  # every CMoE layer
    assert all(set(origins) == {BASE} for origins in manifest["experts"].values())
    assert (state / "tasks" / probe.task / "delta.safetensors").is_file()
    assert expanded.params_added == probe.params_to_add > 0  # the router came with the task, not the plan


def test_the_probe_trains_the_delta_itself_and_hands_it_to_the_expansion(first: tuple) -> None:
    _, probe, _ = first
    warm = load_file(probe.probe_file)
    assert all(s["share"] is None for s in probe.scores.values())  # no probe expert to score
    assert {k.split(".")[1] for k in warm} == {"router", "delta"} and not any(".probe." in k for k in warm)
    assert sum(v.numel() for k, v in warm.items() if ".delta." in k) == probe.params_to_add


def test_training_a_later_task_leaves_the_earlier_delta_bit_identical(
        first: tuple, suite: list, tmp_path: Path) -> None:
    cfg, _, expanded = first
    model, processor = open_lineage(cfg, Path(expanded.state_dir))
    before = {name: tensor_sha(t) for name, t in model.state_dict().items()}
    assert sum(".deltas.0." in name for name in before) > 0
    probe = run_probe(cfg, suite[1], Path(expanded.state_dir), tmp_path / "probe")
    expand_model(cfg, model, processor, suite[1], probe, tmp_path / "expand")
    after = {name: tensor_sha(t) for name, t in model.state_dict().items() if name in before}
    assert [name for name in before if after[name] != before[name]] == []
    moved = [p for layer in cmoe_layers(model).values() for p in layer.deltas[1].parameters()]
    assert moved and not all(torch.equal(p, torch.zeros_like(p)) for p in moved)


def test_a_task_with_an_empty_plan_runs_with_the_delta_it_inherits(first: tuple, suite: list, tmp_path: Path) -> None:
    cfg, probe1, expanded = first
    probe: ProbeReport = run_probe(cfg, suite[1], Path(expanded.state_dir), tmp_path / "probe")
    empty = replace(probe, plan={}, params_to_add=0, router_start=probe1.task)
    result: ExpandResult = run_expand(cfg, suite[1], Path(expanded.state_dir), empty, tmp_path / "expand")
    state = Path(result.state_dir)
    manifest = read_manifest(state)
    assert manifest["delta_uses"] == {probe.task: {layer: probe1.task for layer in manifest["experts"]}}
    assert not (state / "tasks" / probe.task / "delta.safetensors").exists()
    assert result.params_added == 0  # the delta it runs with is task 1's
    assert cmoe_layers(load_state(state))[0].delta_uses == [0, 0]
    assert [e.delta for e in manifest_growth(manifest)] == ["own", f"from {probe1.task}"]  # `cmoe lineage` shows it
