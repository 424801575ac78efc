"""Upcycling: at construction a CMoE model computes what its dense base computes."""

import pytest
import torch
from torch import nn

from cmoe.config import MoEConfig
from cmoe.model.cmoe_layer import CMoELayer, add_task, cmoe_layers
from cmoe.model.routing import route
from cmoe.model.surgery import convert_to_cmoe, decoder_layers, dense_base, resolve_layers

from .helpers import make_batch, tiny_llava


@pytest.mark.parametrize("text", ["llama", "qwen2", "mistral"])
def test_upcycled_model_equals_dense(text: str) -> None:
    model = tiny_llava(text)
    batch = make_batch()
    with torch.no_grad():
        dense = model(**batch).logits
    convert_to_cmoe(model, MoEConfig(layers="all"))
    add_task(model, "a")
    assert all(isinstance(decoder_layers(model)[i].mlp, CMoELayer) for i in range(4))
    with route(model, ["a", "a"]), torch.no_grad():
        moe = model(**batch).logits
    torch.testing.assert_close(moe, dense, atol=1e-6, rtol=0)


def test_layer_choice() -> None:
    assert resolve_layers("every_other", 5) == [0, 2, 4]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers([3, 1], 4) == [1, 3]
    with pytest.raises(ValueError, match="distinct indices"):
        resolve_layers([4], 4)
    model = convert_to_cmoe(tiny_llava(), MoEConfig(layers=[1, 3]))
    assert list(cmoe_layers(model)) == [1, 3]
    assert all(not p.requires_grad for p in model.parameters())  # the base is frozen


def test_non_gated_mlp_is_refused() -> None:
    model = tiny_llava()
    decoder_layers(model)[0].mlp = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(TypeError, match="not a gated MLP"):
        convert_to_cmoe(model, MoEConfig(layers=[0]))


def test_dense_base_recovers_the_base() -> None:
    model = tiny_llava()
    batch = make_batch()
    with torch.no_grad():
        ref = model(**batch).logits
    convert_to_cmoe(model)
    add_task(model, "a")
    with torch.no_grad():
        assert torch.equal(dense_base(model)(**batch).logits, ref)


def test_forward_without_routing_fails_clearly() -> None:
    model = convert_to_cmoe(tiny_llava())
    add_task(model, "a")
    with pytest.raises(RuntimeError, match="no routing set"):
        model(**make_batch())
