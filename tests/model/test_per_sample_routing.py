"""Per-sample routing: every sample uses its own task's router, in forwards and through generate."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cmoe.config import MoEConfig
from cmoe.model.cmoe_layer import add_expert, add_task, cmoe_layers
from cmoe.model.routing import route, routing
from cmoe.model.surgery import convert_to_cmoe

from .helpers import add_distinct_task, cmoe_model, make_batch, tiny_llava


def _logits(model, batch, tasks):  # noqa: ANN001, ANN202
    with route(model, tasks), torch.no_grad():
        return model(**batch).logits


def test_mixed_tasks_in_one_batch_match_single_task_batches() -> None:
    model = cmoe_model()
    add_distinct_task(model, "b")
    batch = make_batch(batch=3)
    mixed = _logits(model, batch, ["a", "b", "a"])
    only_a, only_b = _logits(model, batch, ["a"] * 3), _logits(model, batch, ["b"] * 3)
    torch.testing.assert_close(mixed[[0, 2]], only_a[[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], only_b[1], atol=1e-5, rtol=0)
    assert (only_a - only_b).abs().max() > 1e-2  # the routers really differ


def test_routing_holds_during_generate() -> None:
    model = cmoe_model()
    add_distinct_task(model, "b")
    batch = make_batch(batch=2, seed=3)

    def generate(rows: list[int], tasks: list[str]):  # noqa: ANN202
        sub = {k: v[rows] for k, v in batch.items()}
        with route(model, tasks), torch.no_grad():
            out = model.generate(**sub, max_new_tokens=5, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.scores, dim=1)

    seqs, scores = generate([0, 1], ["a", "b"])
    for row, task in enumerate(["a", "b"]):
        alone_seq, alone_scores = generate([row], [task])
        assert torch.equal(seqs[row], alone_seq[0])
        torch.testing.assert_close(scores[row], alone_scores[0], atol=1e-4, rtol=0)
    _, swapped = generate([0, 1], ["b", "a"])
    assert (swapped - scores).abs().max() > 1e-2  # generated tokens depend on the router


def test_concurrent_calls_on_one_model_each_route_by_their_own_tasks() -> None:
    """Two threads inside `route` at once (as a serving process's requests are): each generates as alone."""
    model = cmoe_model()
    add_distinct_task(model, "b")
    batch = make_batch(batch=3, seed=4)
    calls = {"a": ([0], ["a"]), "b": ([1, 2], ["b", "b"])}  # different sizes: a mix-up cannot pass unseen

    def generate(name: str, inside: threading.Barrier | None = None) -> torch.Tensor:
        rows, tasks = calls[name]
        with route(model, tasks), torch.no_grad():
            if inside is not None:
                inside.wait()  # both threads have set their routing before either generates
            return model.generate(**{k: v[rows] for k, v in batch.items()}, max_new_tokens=4, do_sample=False,
                                  pad_token_id=0)

    alone = {name: generate(name) for name in calls}
    inside = threading.Barrier(len(calls))
    with ThreadPoolExecutor(len(calls)) as pool:
        together = dict(zip(calls, pool.map(lambda name: generate(name, inside), calls)))
    assert all(torch.equal(together[name], alone[name]) for name in calls)
    assert model.cmoe.routing.task_ids is None


def test_route_restores_the_previous_routing_and_checks_tasks() -> None:
    model = cmoe_model()
    with route(model, ["a"]):
        with route(model, torch.tensor([0, 0])):
            assert model.cmoe.routing.task_ids.tolist() == [0, 0]
        assert model.cmoe.routing.task_ids.tolist() == [0]
    assert model.cmoe.routing.task_ids is None
    with pytest.raises(KeyError, match="unknown tasks"), route(model, ["zzz"]):
        pass
    with pytest.raises(ValueError, match="out of range"), route(model, [3]):
        pass


def test_single_router_baseline_grows_and_needs_no_task() -> None:
    model = convert_to_cmoe(tiny_llava(), MoEConfig(layers="every_other"), single_router=True)
    add_task(model, "a")
    add_task(model, "b")
    layer = cmoe_layers(model)[0]
    add_expert(model, 0, "copy", 1)
    assert len(layer.routers) == 1 and layer.routers[0].shape == (5, 32)
    assert layer.routers[0].requires_grad and not layer.experts[0].gate_proj.weight.requires_grad
    with routing(model, "single"), torch.no_grad():
        model(**make_batch())
