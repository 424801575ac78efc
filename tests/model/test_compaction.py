"""Compaction on a tiny model: an unused task expert is retired, identical ones merge, a refused step
is undone exactly, base experts are never touched, and a compacted state replays with its record."""

from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from cmoe.model.cmoe_layer import add_expert, cmoe_info, cmoe_layers
from cmoe.model.compaction import Measured, compact, measure, plan_steps, record
from cmoe.model.routing import route
from cmoe.model.state import load_state, read_manifest, save_state

from .helpers import add_distinct_task, cmoe_model, make_batch, tiny_llava

LAYER = 0  # the first CMoE layer of the every-other layout


def _model() -> LlavaForConditionalGeneration:
    """Tasks a and b; b adds, in layer 0, a used expert, an identical copy of it and one no router picks."""
    torch.manual_seed(0)
    model = cmoe_model()
    add_distinct_task(model, "b")
    layer = cmoe_layers(model)[LAYER]
    used = len(layer.experts) - 1
    copy = add_expert(model, LAYER, "copy", source=used)
    unused = add_expert(model, LAYER, "copy", source=used)
    seen = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    _logits(model, "b")
    hook.remove()
    with torch.no_grad():
        layer.routers[-1][copy] = layer.routers[-1][used]
        # 22 tokens in 32 dimensions: a column whose logit is -100 on every one of them (never in a top-k)
        x = seen[0].float()
        layer.routers[-1][unused] = torch.linalg.lstsq(x, torch.full((x.shape[0], 1), -100.0)).solution[:, 0]
        layer.experts[unused].down_proj.weight.mul_(-1)  # its outputs differ from the pair's
    model.requires_grad_(False)
    return model


def _logits(model: LlavaForConditionalGeneration, task: str) -> torch.Tensor:
    """The logits of the one batch every measurement runs (its first CMoE layer's inputs are the same for all tasks)."""
    with route(model, [task] * 2), torch.no_grad():
        return model(**make_batch(batch=2, seed=3)).logits


def _run(model: LlavaForConditionalGeneration) -> callable:
    return lambda task: _logits(model, task)


def _plan(model: LlavaForConditionalGeneration) -> tuple[Measured, list]:
    measured = measure(model, _run(model))
    return measured, plan_steps(model, measured, min_use=0.0, merge_similarity=0.999)


def test_an_expert_no_router_picks_is_retired_with_its_router_rows() -> None:
    model = _model()
    layer = cmoe_layers(model)[LAYER]
    n, before = len(layer.experts), _logits(model, "b")
    measured, steps = _plan(model)
    retire = [s for s in steps if s.kind == "retire"]
    assert [(s.layer, s.experts, s.score) for s in retire] == [(LAYER, [n - 1], 0.0)]
    compact(model, measured, retire, accept=lambda step: (True, 0.0))
    assert retire[0].outcome == "kept" and len(layer.experts) == n - 1
    assert layer.routers[1].shape[0] == n - 1 and layer.routers[0].shape[0] == 4  # task a never covered it
    torch.testing.assert_close(_logits(model, "b"), before)  # a logit nobody picks changed nothing


def test_two_identical_experts_merge_into_one_with_one_router_column() -> None:
    model = _model()
    layer = cmoe_layers(model)[LAYER]
    n = len(layer.experts)
    measured, steps = _plan(model)
    merges = [s for s in steps if s.kind == "merge"]
    assert [(s.experts, round(s.score, 4)) for s in merges] == [([n - 3, n - 2], 1.0)]
    keep = layer.experts[n - 3].state_dict()
    column = layer.routers[1][n - 3].clone()
    compact(model, measured, merges, accept=lambda step: (True, 0.0))
    assert len(layer.experts) == n - 1 and layer.expert_origin.count("b") == 2
    for k, v in layer.experts[n - 3].state_dict().items():  # the average of two equal experts: the same
        torch.testing.assert_close(v, keep[k])
    assert not any(p.requires_grad for p in layer.experts[n - 3].parameters())
    assert torch.equal(layer.routers[1][n - 3], column)


def test_a_refused_step_leaves_the_model_exactly_as_it_was() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    origins = [list(layer.expert_origin) for layer in cmoe_layers(model).values()]
    measured, steps = _plan(model)
    compact(model, measured, steps, accept=lambda step: (False, 12.5))
    assert {s.outcome for s in steps} == {"refused"} and {s.drop for s in steps} == {12.5}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [list(layer.expert_origin) for layer in cmoe_layers(model).values()] == origins


def test_upcycled_base_experts_are_never_candidates_nor_changed() -> None:
    model = _model()
    measured = measure(model, _run(model))
    steps = plan_steps(model, measured, min_use=1.0, merge_similarity=-1.0)  # everything qualifies
    assert steps and all("base" not in s.origins for s in steps)
    with pytest.raises(ValueError, match="upcycled base expert"):
        cmoe_layers(model)[LAYER].remove_expert(0)


def test_a_compacted_state_replays_exactly_and_records_what_went(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_llava().save_pretrained(base)
    model = _model()
    cmoe_info(model).base_path = str(base)
    measured, steps = _plan(model)
    compact(model, measured, steps, accept=lambda step: (True, 0.0))
    entry = record(model, steps)
    state = save_state(model, tmp_path / "state")
    loaded = load_state(state)
    assert read_manifest(state)["compactions"] == [entry] == cmoe_info(loaded).compactions
    assert [s["kind"] for s in entry["steps"]] == ["retire", "merge"]
    assert [len(x.experts) for x in cmoe_layers(loaded).values()] == [len(x.experts) for x in cmoe_layers(model).values()]
    for task in ("a", "b"):
        torch.testing.assert_close(_logits(loaded, task), _logits(model, task), rtol=0, atol=0)
