"""Expansion: the new state loads, grows exactly the plan, leaves older tasks bit-identical, resumes exactly."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cmoe.stages.expand as expand_stage
from cmoe.model.cmoe_layer import BASE, cmoe_info, cmoe_layers
from cmoe.model.state import load_state, read_manifest
from cmoe.stages.common import open_lineage
from cmoe.stages.expand import expand_model, run_expand
from cmoe.stages.probe import expert_size
from cmoe.stages.trainer import train as real_train

from .conftest import PLANS, Lineage


def tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def test_the_new_state_loads_with_the_task_its_experts_router_and_locator(lineage: Lineage) -> None:
    model = load_state(lineage.state(0))
    info = cmoe_info(model)
    assert info.tasks == [lineage.names[0]]
    assert info.locator.tasks == [lineage.names[0]]
    layers = cmoe_layers(model)
    assert layers[0].expert_origin == [BASE] * lineage.cfg.moe.initial_experts + [lineage.names[0]] * 2
    assert layers[1].expert_origin == [BASE] * lineage.cfg.moe.initial_experts
    assert [tuple(layer.routers[0].shape) for layer in layers.values()] == [(4, 32), (2, 32)]


def test_the_locator_fits_every_prompt_and_its_text_dropout_copies(lineage: Lineage) -> None:
    copies = lineage.cfg.locator.augment_copies
    assert copies > 0
    for expanded in lineage.expands:
        assert expanded.locator["fit_rows"] == (1 + copies) * expanded.locator["samples"]


def test_params_added_are_the_planned_experts_with_their_router_columns(lineage: Lineage) -> None:
    model = load_state(lineage.state(1))
    size = expert_size(model)
    hidden = lineage.cfg.base.text_hidden
    for plan, expanded in zip(PLANS, lineage.expands):
        n_new = sum(plan.values())
        # each new expert: its FFN weights + one column in the task's router
        assert expanded.params_added == n_new * (size + hidden)
    origins = read_manifest(lineage.state(1))["experts"]
    assert [o.count(lineage.names[0]) for o in origins.values()] == [2, 0]
    assert [o.count(lineage.names[1]) for o in origins.values()] == [0, 1]


def test_training_a_later_task_leaves_every_older_tensor_bit_identical_in_memory(
    lineage: Lineage, tmp_path: Path,
) -> None:
    """Hashed in the training process itself, before and after DeepSpeed trains task 2: a state
    reloaded from disk would rebuild the base experts from the base and prove nothing about them."""
    model, processor = open_lineage(lineage.cfg, lineage.state(0))
    before = {name: tensor_sha(t) for name, t in model.state_dict().items()}  # base, task 1, its locator
    assert sum(".experts." in name for name in before) > 10 and sum(".routers.0" in name for name in before) == 2
    expand_model(lineage.cfg, model, processor, lineage.bundles[1], lineage.probes[1], tmp_path / "expand")
    after = {name: tensor_sha(t) for name, t in model.state_dict().items() if name in before}
    assert after.keys() == before.keys()
    assert [name for name in before if after[name] != before[name]] == []
    # the training did move task 2's own tensors: its new expert left the probe it was warm-started from
    warm = load_file(lineage.probes[1].probe_file)
    new = cmoe_layers(model)[1].experts[-1]
    assert cmoe_layers(model)[1].expert_origin[-1] == lineage.names[1]
    assert not torch.equal(new.down_proj.weight, warm["1.probe.down_proj.weight"])


def test_the_older_tasks_delta_files_are_carried_over_byte_identical(lineage: Lineage) -> None:
    for kind in ("experts", "router", "locator"):
        name = f"tasks/{lineage.names[0]}/{kind}.safetensors"
        assert (lineage.state(0) / name).read_bytes() == (lineage.state(1) / name).read_bytes()


def test_an_empty_plan_still_gives_the_task_its_router_and_locator(lineage: Lineage, tmp_path: Path) -> None:
    empty = replace(lineage.probes[1], plan={}, params_to_add=0)
    result = run_expand(lineage.cfg, lineage.bundles[1], lineage.state(0), empty, tmp_path / "expand")
    assert result.params_added == 0
    state = Path(result.state_dir)
    manifest = read_manifest(state)
    assert manifest["tasks"] == lineage.names
    assert manifest["experts"] == read_manifest(lineage.state(0))["experts"]  # no expert was added
    assert set(manifest["deltas"][lineage.names[1]]) == {"experts", "router", "locator"}
    routers = load_file(state / "tasks" / lineage.names[1] / "router.safetensors")
    assert {k: tuple(v.shape) for k, v in routers.items()} == {"layers.0.router": (4, 32), "layers.1.router": (2, 32)}
    assert cmoe_info(load_state(state)).locator.tasks == lineage.names


class Killed(RuntimeError):
    """Stands for the process dying right after the expansion's first checkpoint."""


def test_a_killed_expansion_resumes_from_its_checkpoint_to_the_same_weights(
    lineage: Lineage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, out = lineage.cfg, tmp_path / "expand"
    first_checkpoint = cfg.expand.checkpoint_every

    def dies_after_first_checkpoint(model, params, data, collate, loss_fn, spec, on_log=None):
        def crash(step: int, _metrics: dict) -> None:
            if step == first_checkpoint:
                raise Killed(f"killed at step {step}")
        # logging every step lets the crash land right after the checkpoint (the run itself is unchanged)
        return real_train(model, params, data, collate, loss_fn, replace(spec, log_every=1), on_log=crash)

    monkeypatch.setattr(expand_stage, "train", dies_after_first_checkpoint)
    with pytest.raises(Killed):
        run_expand(cfg, lineage.bundles[1], lineage.state(0), lineage.probes[1], out)
    assert (out / "checkpoints" / f"step{first_checkpoint}").is_dir()
    assert not (out / "state").exists()
    monkeypatch.undo()

    resumed = run_expand(cfg, lineage.bundles[1], lineage.state(0), lineage.probes[1], out)
    assert resumed.train["resumed_from_step"] == first_checkpoint
    assert resumed.train["steps"] > first_checkpoint
    assert not (out / "checkpoints").exists()  # transient: gone once the run finished

    # the uninterrupted run of the same expansion is the lineage's task-2 state
    task = lineage.names[1]
    for kind in ("experts", "router"):
        got = load_file(Path(resumed.state_dir) / "tasks" / task / f"{kind}.safetensors")
        want = load_file(lineage.state(1) / "tasks" / task / f"{kind}.safetensors")
        assert got.keys() == want.keys() and got
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
