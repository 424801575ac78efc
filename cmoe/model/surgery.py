"""Upcycling surgery: find the text decoder of a vision-language model and turn chosen MLPs into CMoE layers.

The decoder is where the model's family says (cmoe.model.families); works on any decoder whose
layers have a gated MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn`: Llama, Qwen2, Mistral, and
the Qwen2-VL and Idefics3 / SmolVLM text models). The conversion is in place and freezes every base
parameter: in the MoE stages only experts and routers train (MoE-LLaVA). A base folder that went through the MoE stage
(`cmoe.model.moe_base`) gives its trained experts and base router instead of copies.
"""

from __future__ import annotations

import copy

from torch import nn

from cmoe.config import MoEConfig
from cmoe.model.cmoe_layer import CMoEInfo, CMoELayer, cmoe_info, cmoe_layers
from cmoe.model.families import attribute, family_of
from cmoe.model.moe_base import load_moe_base

LayerSpec = str | list[int]
_GATED_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


def text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with `.layers`): where the model's family keeps it, or a plain causal LM's."""
    family = family_of(getattr(getattr(model, "config", None), "model_type", None))
    candidate = attribute(model, family.decoder) if family else getattr(model, "model", model)
    if not isinstance(getattr(candidate, "layers", None), nn.ModuleList):
        where = family.decoder if family else "model"
        raise TypeError(f"{type(model).__name__}: no text decoder found at {where}.layers")
    return candidate


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text model's decoder layers; layer `i`'s feed-forward block is `layers[i].mlp`."""
    return text_model(model).layers


def _not_gated(i: int, mlp: object) -> str | None:
    missing = [a for a in _GATED_MLP if not hasattr(mlp, a)]
    return f"decoder layer {i}: {type(mlp).__name__} is not a gated MLP (missing {missing})" if missing else None


def not_gated(model: nn.Module) -> str | None:
    """Why the model's text decoder cannot be upcycled (none where its family keeps it, or its first
    layer without a gated MLP), or None."""
    try:
        layers = decoder_layers(model)
    except TypeError as err:
        return str(err)
    return next(filter(None, (_not_gated(i, getattr(layer, "mlp", None)) for i, layer in enumerate(layers))), None)


def resolve_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """Decoder indices to convert: "every_other" (0, 2, 4, ... as MoE-LLaVA), "all", or a list."""
    if spec == "every_other":
        return list(range(0, num_layers, 2))
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        raise ValueError(f"MoE layers {spec!r}: use 'every_other', 'all' or a list of indices")
    bad = [i for i in spec if not 0 <= i < num_layers]
    if bad or len(set(spec)) != len(spec) or not spec:
        raise ValueError(f"MoE layers {spec}: need distinct indices in [0, {num_layers}), got bad {bad}")
    return sorted(spec)


def convert_to_cmoe(
    model: nn.Module, cfg: MoEConfig | None = None, *, single_router: bool = False, base_path: str | None = None,
) -> nn.Module:
    """Upcycle the chosen layers' MLPs into CMoE layers of `cfg.initial_experts` experts, in place.

    `base_path` is where the base was loaded from; the state format references it by path and hash
    instead of copying it. When it holds a trained MoE base, the experts are its trained experts
    (and new routers start from its base router), else copies of the dense MLP.
    `single_router=True` builds the one-shared-router baseline. Tasks are added afterwards with
    `cmoe_layer.add_task`.
    """
    cfg = cfg or MoEConfig()
    if isinstance(getattr(model, "cmoe", None), CMoEInfo):
        raise ValueError("model is already a CMoE model")
    layers = decoder_layers(model)
    indices = resolve_layers(cfg.layers, len(layers))
    model.requires_grad_(False)
    info = CMoEInfo(cfg.initial_experts, cfg.top_k, cfg.aux_loss_coef, single_router, base_path)
    for i in indices:
        dense = layers[i].mlp
        problem = _not_gated(i, dense)
        if problem:
            raise TypeError(problem)
        layers[i].mlp = CMoELayer(
            dense, dense.down_proj.out_features, cfg.initial_experts, cfg.top_k, i, info.routing, single_router
        )
    model.cmoe = info
    if base_path is not None:
        load_moe_base(model, base_path)
    return model


def dense_base(model: nn.Module) -> nn.Module:
    """A copy of the dense base a CMoE model was upcycled from by copying (expert 0 is then never trained)."""
    cmoe_info(model)
    if any(layer.base_router is not None for layer in cmoe_layers(model).values()):
        raise ValueError("the model's base experts were trained in the MoE stage: no expert is the dense MLP; "
                         "use the base folder it was loaded from")
    base = copy.deepcopy(model)
    layers = decoder_layers(base)
    for i, layer in cmoe_layers(base).items():
        layers[i].mlp = layer.experts[0]
    del base.cmoe
    return base
