"""Retiring a task: its router, VAE, record and the experts it is told to drop go; nothing else moves."""

from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from cmoe.config import LocatorConfig, MoEConfig
from cmoe.model.cmoe_layer import add_task, cmoe_info, cmoe_layers, retire_task
from cmoe.model.locator import fit_task_vae, locator_features
from cmoe.model.params import count_params
from cmoe.model.routing import route
from cmoe.model.state import load_state, save_state
from cmoe.model.surgery import convert_to_cmoe

from .helpers import add_distinct_task, make_batch, tiny_llava


def _model(base_dir: Path, tasks: list[str]) -> LlavaForConditionalGeneration:
    """A base saved to `base_dir`, tasks in order, each with one random expert per CMoE layer and a VAE."""
    if not base_dir.exists():
        tiny_llava().save_pretrained(base_dir)
    torch.manual_seed(0)  # routers and experts draw from the global RNG: the same tasks every time
    model = convert_to_cmoe(LlavaForConditionalGeneration.from_pretrained(base_dir).eval(), MoEConfig(layers="every_other"),
                            base_path=str(base_dir))
    cfg = LocatorConfig(epochs=2, hidden=8, latent_dim=2)
    for seed, task in enumerate(tasks):
        add_distinct_task(model, task)
        cmoe_info(model).task_records[task] = {"eval_set": None, "seed": seed}
        model.cmoe.locator.add_task(task, fit_task_vae(locator_features(model, **make_batch(8, seed=seed)), cfg))
    return model


def _logits(model: LlavaForConditionalGeneration, task: str) -> torch.Tensor:
    with route(model, [task] * 2), torch.no_grad():
        return model(**make_batch(seed=9)).logits


def _experts_of(model: LlavaForConditionalGeneration, task: str) -> list[tuple[int, int]]:
    return [(i, e) for i, layer in cmoe_layers(model).items() for e, o in enumerate(layer.expert_origin) if o == task]


def test_the_last_task_retired_leaves_exactly_the_model_before_it(tmp_path: Path) -> None:
    before = save_state(_model(tmp_path / "base", ["a", "b"]), tmp_path / "ab")
    model = _model(tmp_path / "base", ["a", "b", "c"])
    assert retire_task(model, "c", set(_experts_of(model, "c"))) is None
    expected = load_state(before, LlavaForConditionalGeneration.from_pretrained)
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert cmoe_info(model).tasks == ["a", "b"] and model.cmoe.locator.tasks == ["a", "b"]
    assert list(cmoe_info(model).task_records) == ["a", "b"]
    assert count_params(model) == count_params(expected)


def test_a_kept_expert_goes_to_the_next_task_and_the_state_replays(tmp_path: Path) -> None:
    model = _model(tmp_path / "base", ["a", "b", "c"])
    (drop_layer, drop_index), (keep_layer, keep_index) = _experts_of(model, "b")  # b has one expert in each CMoE layer
    kept = cmoe_layers(model)[keep_layer].experts[keep_index]
    c_router = {i: layer.routers[2].detach().clone() for i, layer in cmoe_layers(model).items()}
    a_before = _logits(model, "a")
    assert retire_task(model, "b", {(drop_layer, drop_index)}) == "c"

    layers = cmoe_layers(model)
    assert all(len(layer.routers) == 2 for layer in layers.values())
    assert layers[keep_layer].expert_origin == ["base"] * 4 + ["a", "c", "c"]
    assert layers[keep_layer].experts[keep_index] is kept and not any(p.requires_grad for p in kept.parameters())
    assert layers[drop_layer].expert_origin == ["base"] * 4 + ["a", "c"]
    # c's router lost exactly the dropped expert's row; a's router never covered b's experts
    assert torch.equal(layers[keep_layer].routers[1], c_router[keep_layer])
    rows = c_router[drop_layer]
    assert torch.equal(layers[drop_layer].routers[1], torch.cat([rows[:drop_index], rows[drop_index + 1:]]))
    assert torch.allclose(_logits(model, "a"), a_before, atol=1e-6)
    with pytest.raises(KeyError, match="unknown tasks"):
        _logits(model, "b")

    loaded = load_state(save_state(model, tmp_path / "retired"), LlavaForConditionalGeneration.from_pretrained)
    assert cmoe_info(loaded).tasks == ["a", "c"] and loaded.cmoe.locator.tasks == ["a", "c"]
    assert cmoe_layers(loaded)[keep_layer].expert_origin == ["base"] * 4 + ["a", "c", "c"]
    for task in ("a", "c"):
        assert torch.equal(_logits(loaded, task), _logits(model, task))


def test_parameters_lose_the_router_the_vae_and_the_dropped_experts(tmp_path: Path) -> None:
    model = _model(tmp_path / "base", ["a", "b"])
    layers = cmoe_layers(model)
    expert = sum(p.numel() for p in layers[0].experts[0].parameters())
    routers = sum(layer.routers[0].numel() for layer in layers.values())
    vae = sum(p.numel() for p in model.cmoe.locator.vaes["a"].parameters())
    a_experts = _experts_of(model, "a")
    before = count_params(model).total
    retire_task(model, "a", set(a_experts[:1]))  # the first dropped (its row of b's router too), the rest kept
    hidden = layers[0].hidden_size
    assert count_params(model).total == before - routers - vae - expert - hidden
    assert list(count_params(model).added_per_task) == ["b"]


def test_refusals_leave_the_model_as_it_was(tmp_path: Path) -> None:
    model = _model(tmp_path / "base", ["a", "b"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not task 'b'"):
        retire_task(model, "b", {_experts_of(model, "a")[0]})
    with pytest.raises(ValueError, match="no later task's router covers them"):
        retire_task(model, "b", set(_experts_of(model, "b")[:1]))
    with pytest.raises(ValueError, match="not in this model"):
        retire_task(model, "z", set())
    assert cmoe_info(model).tasks == ["a", "b"] and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="only task"):
        retire_task(_model(tmp_path / "base", ["a"]), "a", set())
    single = convert_to_cmoe(tiny_llava(), MoEConfig(layers="every_other"), single_router=True)
    add_task(single, "a")
    add_task(single, "b")
    with pytest.raises(ValueError, match="single-router"):
        retire_task(single, "a", set())
