"""Parameter accounting of a CMoE model: total, active per token, and what each task added [13].

"Active per token" counts everything outside the CMoE layers (vision tower, projector, embeddings,
attention, norms, lm_head: every token's forward touches them) plus, per CMoE layer, top-k experts
and the current task's router and delta. Locator VAEs run once per sample, not per token: they count in the
total and in what their task added, not in the active count.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cmoe.model.cmoe_layer import cmoe_info, cmoe_layers


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one CMoE model (JSON-serialisable through `dataclasses.asdict`)."""

    total: int  # every parameter: base, all experts, routers, locator VAEs
    dense_base: int  # the base before upcycling: non-MoE + one dense MLP per CMoE layer
    active_per_token: int  # non-MoE + top-k experts + the current router, per CMoE layer
    upcycled: int  # the E0 - 1 extra copies of the dense MLP per CMoE layer
    added_per_task: dict[str, int]  # experts + router columns (+ delta, locator VAE) each task added


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(model: nn.Module) -> ParamCounts:
    """Count total, dense-base, active-per-token, upcycled and per-task parameters of `model`."""
    info = cmoe_info(model)
    layers = cmoe_layers(model).values()
    total = _numel(model)
    moe = sum(_numel(layer) for layer in layers)
    non_moe = total - moe - _numel(info.locator)
    expert = {id(layer): _numel(layer.experts[0]) for layer in layers}
    added = {task: 0 for task in info.tasks}
    for t, task in enumerate(info.tasks):
        for layer in layers:
            n_new = sum(origin == task for origin in layer.expert_origin)
            added[task] += n_new * expert[id(layer)]
            if info.single_router:  # the shared router: created with the first task, a column per expert since
                added[task] += layer.hidden_size * (n_new + (info.initial_experts if t == 0 else 0))
            else:
                added[task] += layer.routers[t].numel() + _numel(layer.deltas[t])
        if task in info.locator.vaes:
            added[task] += _numel(info.locator.vaes[task])
    return ParamCounts(
        total=total,
        dense_base=non_moe + sum(expert.values()),
        active_per_token=non_moe + sum(
            layer.top_k * expert[id(layer)] + (layer.routers[-1].numel() if len(layer.routers) else 0)
            + (_numel(layer.deltas[-1]) if len(layer.deltas) else 0)
            for layer in layers
        ),
        upcycled=sum((info.initial_experts - 1) * n for n in expert.values()),
        added_per_task=added,
    )
