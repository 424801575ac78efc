"""Gradient checkpointing (expand.gradient_checkpointing) changes memory, never results: a checkpointed
training step gives the loss and gradients of a plain one, its recomputes route as its forwards did,
wherever and whenever autograd runs them, and the stages turn it on only when the config says so."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmoe.config import tiny_test_config
from cmoe.model.base import load_base
from cmoe.model.cmoe_layer import add_task, attach_probes, aux_loss, balance_scope, cmoe_layers, trainable_parameters
from cmoe.model.gradient_checkpointing import enable_gradient_checkpointing
from cmoe.model.routing import route
from cmoe.model.surgery import convert_to_cmoe, decoder_layers
from cmoe.stages.common import open_lineage


@pytest.fixture(scope="module")
def probed(tiny_base: Path) -> tuple[torch.nn.Module, dict]:
    """The tiny base upcycled as the probe trains it (task router + a probe expert per layer), and a
    padded batch of answers to learn."""
    cfg = tiny_test_config(".")
    model, processor = load_base(tiny_base)
    convert_to_cmoe(model, cfg.moe)
    add_task(model, "t")
    torch.manual_seed(0)
    attach_probes(model, source=0)
    rows = [("what colour is it?", "red"), ("what shape?", "a circle"), ("how many shapes are there?", "two")]
    batch = processor.collate([processor.encode(Image.new("RGB", (32, 32), c), q, a)
                               for c, (q, a) in zip(("red", "blue", "green"), rows)])
    return model, batch


def _twice(t: torch.Tensor) -> torch.Tensor:
    """A sum over two ranks holding the same counts, standing in for the trainer's all-reduce."""
    return 2 * t


def _step(model: torch.nn.Module, batch: dict, backward=lambda loss: loss.backward()):  # noqa: ANN001, ANN202
    """One training step's loss (LM + load balancing, as cmoe.stages.common.moe_loss) and its trainable
    gradients; `backward` runs the backward, after the routing context has closed."""
    model.train()
    for p in trainable_parameters(model):
        p.grad = None
    with route(model, ["t"] * len(batch["input_ids"])), balance_scope(model, batch["attention_mask"], _twice):
        loss = model(**batch).loss + aux_loss(model)
    backward(loss)
    return loss.detach(), [p.grad.clone() for p in trainable_parameters(model)]


def _twins(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of the (never stepped) fixture model: as it is, and checkpointed."""
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    enable_gradient_checkpointing(checkpointed)
    return plain, checkpointed


def _forwards_per_layer(model: torch.nn.Module, batch: dict) -> int:
    calls = []
    hook = next(iter(cmoe_layers(model).values())).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        _step(model, batch)
    finally:
        hook.remove()
    return len(calls)


def test_a_checkpointed_step_gives_the_loss_and_gradients_of_a_plain_one(probed) -> None:  # noqa: ANN001
    model, twin = _twins(probed[0])
    batch = probed[1]
    assert (_forwards_per_layer(model, batch), _forwards_per_layer(twin, batch)) == (1, 2)  # it does recompute
    loss, grads = _step(model, batch)
    twin_loss, twin_grads = _step(twin, batch)
    torch.testing.assert_close(twin_loss, loss, atol=1e-6, rtol=0)
    for ours, theirs in zip(twin_grads, grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_a_recompute_on_another_thread_routes_as_its_forward_did(probed) -> None:  # noqa: ANN001
    """On a GPU autograd runs the backward on a thread of its own, where the per-thread routing is unset."""
    model, twin = _twins(probed[0])
    batch = probed[1]
    _, grads = _step(model, batch)
    with ThreadPoolExecutor(1) as pool:
        _, twin_grads = _step(twin, batch, lambda loss: pool.submit(loss.backward).result())
    for ours, theirs in zip(twin_grads, grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_a_recompute_sums_nothing_over_ranks_and_keeps_the_forwards_aux_losses(probed) -> None:  # noqa: ANN001
    _, twin = _twins(probed[0])
    batch = probed[1]
    sums: list[int] = []
    twin.train()
    with route(twin, ["t"] * 3), balance_scope(twin, batch["attention_mask"], lambda t: sums.append(1) or 2 * t):
        loss = twin(**batch).loss + aux_loss(twin)
    forward = [layer.aux_loss for layer in cmoe_layers(twin).values()]
    in_forward = len(sums)
    loss.backward()
    assert in_forward == len(cmoe_layers(twin)) and len(sums) == in_forward  # a collective in a backward could hang
    assert all(layer.aux_loss is aux for layer, aux in zip(cmoe_layers(twin).values(), forward))


def test_the_stages_checkpoint_the_decoder_only_when_the_config_says_so(tiny_base: Path) -> None:
    for on in (False, True):
        cfg = tiny_test_config(".")
        cfg.base.path, cfg.expand.gradient_checkpointing = str(tiny_base), on
        model, _ = open_lineage(cfg, None)
        assert {layer.gradient_checkpointing for layer in decoder_layers(model)} == {on}
