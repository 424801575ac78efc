"""A task's delta of the base experts: it starts as no change, changes only its own task's tokens,
trains alone, passes on to the tasks started from it, is saved and loaded exactly, and leaves with
its task unless a later task runs with it."""

from pathlib import Path

import pytest
import torch

from cmoe.config import MoEConfig
from cmoe.model.cmoe_layer import (
    BASE, add_delta, add_task, cmoe_layers, restart_router, retire_task, trainable_parameters,
)
from cmoe.model.params import count_params
from cmoe.model.routing import route
from cmoe.model.state import load_state, read_manifest, save_state
from cmoe.model.surgery import convert_to_cmoe

from .helpers import cmoe_model, make_batch, tiny_llava


def _logits(model, batch, tasks):  # noqa: ANN001, ANN202
    with route(model, tasks), torch.no_grad():
        return model(**batch).logits


def _with_delta(name: str = "b", rank: int = 2) -> torch.nn.Module:
    """Task "a", then task `name` with a delta in every CMoE layer, its B moved off zero."""
    model = cmoe_model()
    add_task(model, name)
    for i in cmoe_layers(model):
        add_delta(model, i, rank)
    with torch.no_grad():
        for layer in cmoe_layers(model).values():
            for p in layer.deltas[-1].parameters():
                p.normal_(0.0, 0.5)
    return model


def _c_started_from_b() -> torch.nn.Module:
    """`_with_delta`'s model, then task c with its router started from b's (so running with b's delta)."""
    model = _with_delta()
    add_task(model, "c")
    restart_router(model, "b")
    return model


def test_a_new_delta_starts_as_no_change() -> None:
    model = cmoe_model()
    add_task(model, "b")
    batch = make_batch()
    before = _logits(model, batch, ["b", "b"])
    for i in cmoe_layers(model):
        add_delta(model, i, 4)
    torch.testing.assert_close(_logits(model, batch, ["b", "b"]), before, atol=1e-6, rtol=0)


def test_a_delta_changes_its_tasks_tokens_and_no_other_tasks() -> None:
    model = _with_delta()
    batch = make_batch(batch=3)
    only_a, only_b = _logits(model, batch, ["a"] * 3), _logits(model, batch, ["b"] * 3)
    mixed = _logits(model, batch, ["a", "b", "a"])
    torch.testing.assert_close(mixed[[0, 2]], only_a[[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], only_b[1], atol=1e-5, rtol=0)
    # task b's router is a copy of a's and it added no expert: only its delta can make it differ
    assert (only_a - only_b).abs().max() > 1e-2


def test_only_the_current_tasks_delta_and_router_train() -> None:
    model = _with_delta()
    params = {id(p) for p in trainable_parameters(model)}
    for layer in cmoe_layers(model).values():
        assert {id(p) for p in layer.deltas[-1].parameters()} <= params
        assert not any(id(p) in params for p in layer.experts.parameters())
    add_task(model, "c")  # task b is done: its delta freezes with everything else it owns
    assert not any(p.requires_grad for layer in cmoe_layers(model).values() for p in layer.deltas[1].parameters())


def test_a_delta_covers_the_base_experts_only() -> None:
    model = cmoe_model()
    add_task(model, "b")
    layer = next(iter(cmoe_layers(model).values()))
    layer.add_expert("b")
    n = add_delta(model, layer.layer_index, 2)
    assert len(layer.deltas[-1].experts) == 4  # E0 = 4, not the task expert
    assert n == 4 * 3 * 2 * (32 + 64)  # gate, up, down: rank * (in + out) each


def test_the_state_saves_and_loads_a_delta_exactly(tmp_path: Path) -> None:
    model = _with_delta()
    state = save_state(model, tmp_path / "state", copy_base=True)
    assert (state / "tasks" / "b" / "delta.safetensors").is_file()
    assert not (state / "tasks" / "a" / "delta.safetensors").exists()  # task a grew none
    loaded = load_state(state)
    batch = make_batch(batch=2)
    assert torch.equal(_logits(loaded, batch, ["a", "b"]), _logits(model, batch, ["a", "b"]))


def test_retiring_a_task_takes_its_delta_and_leaves_the_others() -> None:
    model = _with_delta()
    add_task(model, "c")
    batch = make_batch(batch=2)
    before_c = _logits(model, batch, ["c", "c"])
    retire_task(model, "b", set())
    assert all(len(layer.deltas) == 2 for layer in cmoe_layers(model).values())  # a's and c's
    assert torch.equal(_logits(model, batch, ["c", "c"]), before_c)


def test_a_single_router_model_has_no_delta() -> None:
    model = convert_to_cmoe(tiny_llava(), MoEConfig(layers="every_other"), single_router=True)
    add_task(model, "a")
    with pytest.raises(ValueError, match="single-router"):
        add_delta(model, next(iter(cmoe_layers(model))), 2)


def test_a_task_started_from_another_runs_with_its_delta_and_owns_none() -> None:
    model = _c_started_from_b()
    batch = make_batch(batch=2)
    torch.testing.assert_close(_logits(model, batch, ["c", "c"]), _logits(model, batch, ["b", "b"]), atol=1e-6, rtol=0)
    assert count_params(model).added_per_task["c"] == sum(layer.routers[2].numel() for layer in cmoe_layers(model).values())
    restart_router(model, BASE)  # started from the base instead: no delta
    torch.testing.assert_close(_logits(model, batch, ["c", "c"]), _logits(model, batch, ["a", "a"]), atol=1e-6, rtol=0)


def test_a_task_that_grows_from_an_inherited_delta_starts_from_a_copy_of_it() -> None:
    model = _c_started_from_b()
    batch = make_batch(batch=2)
    inherited = _logits(model, batch, ["c", "c"])
    for i in cmoe_layers(model):
        add_delta(model, i, 2)
    torch.testing.assert_close(_logits(model, batch, ["c", "c"]), inherited, atol=1e-6, rtol=0)
    layer = next(iter(cmoe_layers(model).values()))
    assert layer.deltas[2] is not layer.deltas[1] and all(p.requires_grad for p in layer.deltas[2].parameters())
    assert not any(p.requires_grad for p in layer.deltas[1].parameters())  # b's own stays frozen


def test_an_inherited_delta_is_saved_as_a_reference_and_loads_exactly(tmp_path: Path) -> None:
    model = _c_started_from_b()
    state = save_state(model, tmp_path / "state", copy_base=True)
    assert not (state / "tasks" / "c" / "delta.safetensors").exists()
    assert read_manifest(state)["delta_uses"] == {"c": {str(i): "b" for i in cmoe_layers(model)}}
    batch = make_batch(batch=2)
    assert torch.equal(_logits(load_state(state), batch, ["c", "a"]), _logits(model, batch, ["c", "a"]))


def test_retiring_a_task_whose_delta_a_later_task_runs_with_hands_the_delta_on() -> None:
    model = _c_started_from_b()
    batch = make_batch(batch=2)
    before = _logits(model, batch, ["c", "c"])
    retire_task(model, "b", set())
    assert torch.equal(_logits(model, batch, ["c", "c"]), before)
    layer = next(iter(cmoe_layers(model).values()))
    assert layer.delta_uses == [None, 1] and layer.deltas[1]  # c now owns the delta it ran with
