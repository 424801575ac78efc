"""Probe experts (PGKE): attach, train, score, then drop exactly or promote to a real expert."""

import pytest
import torch

from cmoe.model.cmoe_layer import (
    add_expert, add_task, attach_probes, cmoe_layers, drop_probes, expert_usage, load_probe_state, probe_scores,
    probe_state, promote_probe, record_routing,
)
from cmoe.model.routing import route

from .helpers import cmoe_model, make_batch, train_steps


def _probed_model():  # noqa: ANN202
    """Tasks "a", "b" with distinguishable experts (base copies perturbed); b's usage recorded."""
    model = cmoe_model()
    add_task(model, "b")
    with torch.no_grad():
        for layer in cmoe_layers(model).values():
            for e, expert in enumerate(layer.experts):
                expert.down_proj.weight.add_(0.01 * e)
    with record_routing(model), route(model, ["b"] * 2), torch.no_grad():
        model(**make_batch())
    return model


def _logits(model, tasks=("b", "b")):  # noqa: ANN001, ANN202
    with route(model, list(tasks)), torch.no_grad():
        return model(**make_batch(seed=5)).logits


def test_probe_copies_the_most_used_expert_and_is_scored() -> None:
    model = _probed_model()
    usage = expert_usage(model)
    assert all(sum(u) == 2 * 11 * 2 for u in usage.values())  # top-2 of 2 samples x 11 tokens
    attach_probes(model)
    for i, layer in cmoe_layers(model).items():
        most_used = max(range(4), key=usage[i].__getitem__)
        assert torch.equal(layer.probe.down_proj.weight, layer.experts[most_used].down_proj.weight)
        assert layer.routers[-1].shape[0] == 5 and layer.probe.down_proj.weight.requires_grad


def test_probe_share_and_mass_are_what_the_probe_received_counted_by_hooks() -> None:
    model = _probed_model()
    attach_probes(model)
    train_steps(model, "b", steps=2)
    layers = cmoe_layers(model)
    rows = {i: 0 for i in layers}  # tokens dispatched to the probe: it only ever sees its own tokens
    mass = {i: [] for i in layers}  # the probe column of b's router softmax, recomputed from the input
    hooks = [layer.probe.register_forward_hook(lambda _m, args, _out, i=i: rows.__setitem__(i, rows[i] + len(args[0])))
             for i, layer in layers.items()]
    hooks += [layer.register_forward_pre_hook(
        lambda m, args, i=i: mass[i].append((args[0].flatten(0, 1) @ m.routers[-1].T).softmax(-1)[:, -1]))
        for i, layer in layers.items()]
    with record_routing(model), route(model, ["b"] * 2), torch.no_grad():
        model(**make_batch(seed=7))
    for h in hooks:
        h.remove()
    scores = probe_scores(model)
    assert list(scores) == [0, 2]
    for i, s in scores.items():
        assert 0 < rows[i] < 22  # the probe won some, not all, of the tokens: the check below can tell
        assert (s.share, s.tokens, s.num_experts) == (rows[i] / 22, 22, 4)  # 2 samples x 11 tokens
        assert s.mass == pytest.approx(torch.cat(mass[i]).mean().item(), rel=1e-5)


def test_drop_restores_the_exact_previous_state() -> None:
    model = _probed_model()
    before = _logits(model)
    routers = [layer.routers[-1].detach().clone() for layer in cmoe_layers(model).values()]
    attach_probes(model, source=0)
    train_steps(model, "b", steps=2)  # trains the probes and b's router
    assert not torch.equal(_logits(model), before)
    drop_probes(model)
    assert torch.equal(_logits(model), before)
    for layer, r in zip(cmoe_layers(model).values(), routers):
        assert layer.probe is None and torch.equal(layer.routers[-1], r) and layer.routers[-1].requires_grad


def test_promote_keeps_the_trained_probe_as_a_task_expert() -> None:
    model = _probed_model()
    attach_probes(model)
    train_steps(model, "b", steps=2)
    probe = cmoe_layers(model)[2].probe
    trained = _logits(model)
    assert promote_probe(model, 2) == 4
    layer2 = cmoe_layers(model)[2]
    assert layer2.experts[4] is probe and layer2.expert_origin[4] == "b" and layer2.probe is None
    with pytest.raises(RuntimeError, match="probe is attached"):
        add_expert(model, 0)
    drop_probes(model)  # layer 0's probe goes, layer 2's promoted expert stays
    assert len(cmoe_layers(model)[0].experts) == 4 and cmoe_layers(model)[0].routers[-1].shape[0] == 4
    assert layer2.routers[-1].shape[0] == 5
    assert not torch.equal(_logits(model), trained)  # layer 0 lost its probe
    with pytest.raises(RuntimeError, match="no probe attached"):
        promote_probe(model, 2)


def test_probe_scores_need_recorded_routing() -> None:
    model = _probed_model()
    attach_probes(model)
    with pytest.raises(RuntimeError, match="record_routing"):
        probe_scores(model)


def _trained_probe_state() -> dict[str, torch.Tensor]:
    model = _probed_model()
    attach_probes(model)
    train_steps(model, "b", steps=2)
    return probe_state(model)


def test_probe_state_restores_the_trained_probes_and_router_in_a_fresh_model() -> None:
    trained = _probed_model()
    attach_probes(trained)
    train_steps(trained, "b", steps=2)
    fresh = _probed_model()
    load_probe_state(fresh, probe_state(trained))
    assert torch.equal(_logits(fresh), _logits(trained))
    for mine, theirs in zip(cmoe_layers(fresh).values(), cmoe_layers(trained).values()):
        assert torch.equal(mine.routers[-1], theirs.routers[-1])
        assert mine.probe.down_proj.weight.requires_grad


def test_drop_probes_can_keep_the_router_columns_trained_beside_the_probe() -> None:
    state = _trained_probe_state()
    model = _probed_model()
    load_probe_state(model, state)
    drop_probes(model, keep_router=True)
    for i, layer in cmoe_layers(model).items():
        assert layer.probe is None and layer.routers[-1].requires_grad
        assert torch.equal(layer.routers[-1], state[f"{i}.router"][:-1])


def test_probe_state_of_other_layers_is_refused() -> None:
    state = {k: v for k, v in _trained_probe_state().items() if not k.startswith("2.")}
    with pytest.raises(ValueError, match=r"layers \[0\], the model's CMoE layers are \[0, 2\]"):
        load_probe_state(_probed_model(), state)
