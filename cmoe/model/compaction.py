"""Bounded growth: which task experts to retire or merge, measured on forwards of the kept evaluation sets.

The surgery is the CMoE layer's (`remove_expert`, `merge_experts`); this module decides
(docs/method.md, "Bounded growth"):

- **Usage** of an expert under a router: the share of the router's tokens whose top-k includes it,
  each task's router on its own task's data (`record_routing`; the shared router of a
  single-router model on every task's data). An expert no router that covers it uses above
  `min_use` is a retirement candidate, least used first.
- **Similarity** of two task experts: the mean per-token cosine of their outputs on the inputs the
  layer saw in those forwards (at most `TOKENS_PER_TASK` per task and layer). A pair at or above
  `merge_similarity` is a merge candidate, most similar first: weights averaged, and each router
  that covered both keeps the column of the one it gave more probability mass (a bias-free router
  row cannot hold the logsumexp of two logits; the larger of the two is its dominant term).
- **Steps**: retirements, then merges, each applied and kept only if `accept` (the caller's
  accuracy check) says so, else undone exactly. Usage and similarity are measured once, before the
  first step; a step whose experts an earlier kept step removed or replaced is not tried.
- Upcycled base experts are never candidates: they are the frozen base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.model.cmoe_layer import BASE, CMoELayer, cmoe_info, cmoe_layers, record_routing

TOKENS_PER_TASK = 512  # layer inputs kept per task for the similarity: enough for a stable mean, cheap to run
RunTask = Callable[[str], None]  # runs the forwards of task t's kept set under its routing
Accept = Callable[["Step"], tuple[bool, float]]  # (keep the step?, the worst accuracy drop it caused)


@dataclass
class Measured:
    """What the decisions read, per CMoE layer: usage and mass per task and expert, similarity per pair."""

    usage: dict[int, dict[str, list[float]]]  # share of the task's tokens whose top-k picked each expert
    mass: dict[int, dict[str, list[float]]]  # mean router probability of each expert on the task's tokens
    similarity: dict[int, dict[tuple[int, int], float]]  # (e, f) task experts, e < f -> mean output cosine


@dataclass
class Step:
    """One retirement or merge: what it touches (indices when measured), why, and what became of it."""

    kind: Literal["retire", "merge"]
    layer: int
    experts: list[int]
    origins: list[str]
    score: float  # retire: the highest usage by a router that covers it; merge: output cosine
    outcome: Literal["kept", "refused", "skipped"] | None = None  # skipped: an earlier step changed its experts
    drop: float | None = None  # the worst task accuracy drop it caused (points)

    def record(self) -> dict:
        """The step as the manifest and the stage result list it."""
        return {"kind": self.kind, "layer": self.layer, "experts": self.experts, "origins": self.origins,
                "score": self.score, "outcome": self.outcome, "drop": self.drop}


@torch.no_grad()
def measure(model: nn.Module, run: RunTask) -> Measured:
    """Run every task's forwards (`run(task)`) once, counting routing and keeping layer inputs."""
    info = cmoe_info(model)
    layers = cmoe_layers(model)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    seen = dict.fromkeys(layers, 0)

    def keep_input(i: int) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            room = TOKENS_PER_TASK - seen[i]
            if room > 0:
                x = args[0].reshape(-1, args[0].shape[-1])[:room]
                inputs[i].append(x.detach())
                seen[i] += x.shape[0]
        return hook

    usage: dict[int, dict[str, list[float]]] = {i: {} for i in layers}
    mass: dict[int, dict[str, list[float]]] = {i: {} for i in layers}
    handles = [layer.register_forward_pre_hook(keep_input(i)) for i, layer in layers.items()]
    try:
        for task in info.tasks:
            seen.update(dict.fromkeys(layers, 0))
            with record_routing(model):
                run(task)
            for i, layer in layers.items():
                stats, n = layer.stats, len(layer.experts)
                tokens = max(int(stats["tokens"]), 1)
                usage[i][task] = (stats["topk_counts"][:n].double() / tokens).tolist()
                mass[i][task] = (stats["prob_sum"][:n].double() / tokens).tolist()
    finally:
        for h in handles:
            h.remove()
    similarity = {i: _similarity(layer, torch.cat(inputs[i])) if inputs[i] else {} for i, layer in layers.items()}
    return Measured(usage, mass, similarity)


def _similarity(layer: CMoELayer, x: torch.Tensor) -> dict[tuple[int, int], float]:
    """Mean per-token cosine of the outputs of every pair of task experts of `layer` on inputs `x`."""
    ours = [e for e, o in enumerate(layer.expert_origin) if o != BASE]
    out = {e: layer.experts[e](x).float() for e in ours}
    return {(e, f): float(F.cosine_similarity(out[e], out[f], dim=-1).mean())
            for k, e in enumerate(ours) for f in ours[k + 1:]}


def users(model: nn.Module, layer: int, e: int) -> list[str]:
    """The tasks whose routers cover expert `e` of `layer` (every task under a shared router)."""
    info = cmoe_info(model)
    if info.single_router:
        return list(info.tasks)
    return [info.tasks[u] for u in cmoe_layers(model)[layer].covered_by(e)]


def nearest_candidates(model: nn.Module, measured: Measured) -> dict[int, dict[str, float | None]]:
    """Per layer, the least-used task expert's use (by the routers that cover it) and the most similar
    pair's output cosine: how far each layer is from `min_use` / `merge_similarity` (None: no such expert)."""
    out = {}
    for i, layer in cmoe_layers(model).items():
        uses = [max((measured.usage[i][t][e] for t in users(model, i, e)), default=0.0)
                for e, origin in enumerate(layer.expert_origin) if origin != BASE]
        out[i] = {"least_use": min(uses, default=None), "most_similar": max(measured.similarity[i].values(), default=None)}
    return out


def plan_steps(model: nn.Module, measured: Measured, min_use: float, merge_similarity: float,
               layers: set[int] | None = None) -> list[Step]:
    """Retirement candidates (least used first), then merge candidates (most similar first)."""
    retire, merge = [], []
    for i, layer in cmoe_layers(model).items():
        if layers is not None and i not in layers:
            continue
        for e, origin in enumerate(layer.expert_origin):
            if origin != BASE:
                use = max((measured.usage[i][t][e] for t in users(model, i, e)), default=0.0)
                if use <= min_use:
                    retire.append(Step("retire", i, [e], [origin], use))
        for (e, f), cos in measured.similarity[i].items():
            if cos >= merge_similarity:
                merge.append(Step("merge", i, [e, f], [layer.expert_origin[e], layer.expert_origin[f]], cos))
    return sorted(retire, key=lambda s: s.score) + sorted(merge, key=lambda s: -s.score)


def compact(model: nn.Module, measured: Measured, steps: list[Step], accept: Accept,
            done: Callable[[], bool] | None = None) -> list[Step]:
    """Try `steps` in order, keeping each that `accept` keeps and undoing the others; stop once `done()`.

    Experts are tracked by identity, not index: a kept step shifts the indices after it, and a
    step whose experts a kept step removed or replaced is skipped. Returns `steps`, outcomes filled.
    """
    layers = cmoe_layers(model)
    who = {(s.layer, e): layers[s.layer].experts[e] for s in steps for e in s.experts}
    for step in steps:
        if done is not None and done():
            break
        layer = layers[step.layer]
        now = [_index(layer, who[(step.layer, e)]) for e in step.experts]
        if None in now:
            step.outcome = "skipped"
            continue
        snap = layer.snapshot()
        if step.kind == "retire":
            layer.remove_expert(now[0])
        else:
            layer.merge_experts(now[0], now[1], _columns(model, measured, step, now))
        ok, step.drop = accept(step)
        step.outcome = "kept" if ok else "refused"
        if not ok:
            layer.restore(snap)
    return steps


def _index(layer: CMoELayer, expert: nn.Module) -> int | None:
    return next((e for e, x in enumerate(layer.experts) if x is expert), None)


def _columns(model: nn.Module, measured: Measured, step: Step, now: list[int]) -> dict[int, int]:
    """For each router covering both experts of a merge, the current index of the one it gave more mass."""
    info = cmoe_info(model)
    layer = cmoe_layers(model)[step.layer]
    e, f = step.experts  # indices when measured, as `measured` has them
    mass = measured.mass[step.layer]
    columns = {}
    for u in layer.covered_by(now[1]):
        tasks = info.tasks if info.single_router else [info.tasks[u]]
        columns[u] = now[0] if sum(mass[t][e] for t in tasks) >= sum(mass[t][f] for t in tasks) else now[1]
    return columns


def record(model: nn.Module, steps: list[Step]) -> dict:
    """Add the kept steps to the model's compaction history (saved in the state's manifest); the entry."""
    info = cmoe_info(model)
    entry = {"after_task": info.tasks[-1] if info.tasks else None,
             "steps": [s.record() for s in steps if s.outcome == "kept"]}
    info.compactions.append(entry)
    return entry
