"""Experts and routers of earlier tasks stay bit-identical while a later task trains."""

import hashlib

import pytest
import torch

from cmoe.model.cmoe_layer import add_expert, add_task, cmoe_layers, trainable_parameters

from .helpers import cmoe_model, train_steps


def _hashes(model) -> dict[str, str]:  # noqa: ANN001
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def test_earlier_tasks_are_bit_identical_after_a_later_task_trains() -> None:
    model = cmoe_model()
    for i in cmoe_layers(model):
        add_expert(model, i, "random")
    train_steps(model, "a")
    before = _hashes(model)
    add_task(model, "b")
    for i in cmoe_layers(model):
        add_expert(model, i, "copy", source=4)
    fresh = {n: h for n, h in _hashes(model).items() if n not in before}  # b's experts and routers
    train_steps(model, "b", steps=4, seed=2)
    after = _hashes(model)
    assert [n for n in before if after[n] != before[n]] == []  # nothing old moved, weight decay included
    moved = {n for n in fresh if after[n] != fresh[n]}
    assert {n for n in fresh if n.endswith("routers.1")} <= moved and any(".experts.5." in n for n in moved)


def test_trainable_parameters_are_exactly_the_current_tasks() -> None:
    model = cmoe_model()
    add_task(model, "b")
    layer = cmoe_layers(model)[2]
    e = add_expert(model, 2, "copy")
    params = {id(p) for p in trainable_parameters(model)}
    expected = {id(p) for p in layer.experts[e].parameters()} | {id(layer.routers[1]), id(cmoe_layers(model)[0].routers[1])}
    assert params == expected
    assert all(p.requires_grad for p in trainable_parameters(model))
    assert sum(p.requires_grad for p in model.parameters()) == len(expected)
    with pytest.raises(ValueError, match="frozen"):
        trainable_parameters(model, "a")
    torch.testing.assert_close(layer.routers[1][:4], layer.routers[0])  # warm start from a's router
