"""Compaction: a new state with fewer experts, every task still within `compact.max_drop` of its accuracy.

The model layer does the surgery and the decisions (`cmoe.model.compaction`); this stage feeds
them the kept evaluation sets and checks every step on them:

- **Measured on the kept sets.** Each task answers its own kept evaluation set with its own router
  (oracle routing, batched greedy decoding, as `cmoe.stages.retire` counts usage) while routing is
  counted and layer inputs are kept; never a bundle.
- **Each step checked.** After each retirement or merge every task answers its kept set as users
  are answered (locator routing; the shared router of a single-router model) and the step stays
  only if no task is more than `compact.max_drop` points below its accuracy before the first step
  (not the previous step: small drops cannot add up past the limit).
- **A full layer before it grows** (`moe.max_experts_per_layer`): `run_make_room` compacts only the
  layers that are full until each has room for one expert, and `room` / `cap_plan` bound a plan by
  what is free; a layer that cannot be compacted within the limit does not grow.
- The new state travels alone (base copied), as an expansion's does; its manifest records what was
  retired and merged (`compactions`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmoe.config import CmoeConfig
from cmoe.files import write_text_atomic
from cmoe.model.cmoe_layer import cmoe_info, cmoe_layers
from cmoe.model.compaction import Step, compact, measure, nearest_candidates, plan_steps, record
from cmoe.model.params import count_params
from cmoe.model.state import read_manifest, save_state
from cmoe.stages.common import StageError, TaskData, encode_rows, kept_eval_sets, open_lineage
from cmoe.stages.evaluate import answer_task, task_accuracy


@dataclass
class CompactResult:
    """The compacted state and every step tried; JSON-serialisable."""

    state_dir: str
    experts_before: dict[str, int]  # per CMoE layer
    experts_after: dict[str, int]
    steps: list[dict]  # kind, layer, experts (indices when measured), origins, score, outcome, drop
    retired: int
    merged: int
    acc_before: dict[str, float]  # per task, as users are answered
    acc_after: dict[str, float]
    params_before: int
    params_after: int
    params_added: int  # params_after - params_before: negative, what the gate's budget reads
    wall_s: float
    # per CMoE layer, before any step: the least-used task expert's use and the most similar pair's
    # cosine, against compact.min_use / merge_similarity (why a layer had nothing to compact)
    nearest: dict[str, dict[str, float | None]] = field(default_factory=dict)


def run_compact(cfg: CmoeConfig, state_dir: Path, out_dir: Path) -> CompactResult:
    """Compact every CMoE layer of the state at `state_dir`; write the new state to out_dir/state and
    every step tried, with each task's accuracy before and after, to out_dir/compact.json."""
    t0 = time.perf_counter()
    model, processor = open_lineage(cfg, Path(state_dir))
    result = _compacted(cfg, model, processor, None, out_dir, t0)
    write_text_atomic(Path(out_dir) / "compact.json", json.dumps(asdict(result), indent=2))
    return result


def run_make_room(cfg: CmoeConfig, state_dir: Path, out_dir: Path) -> CompactResult | None:
    """Compact the layers of `state_dir` that hold `moe.max_experts_per_layer` experts until each has
    room for one more; None (nothing written) when no layer is full: build on `state_dir` as it is."""
    t0 = time.perf_counter()
    full = full_layers(cfg, Path(state_dir))
    if not full:
        return None
    model, processor = open_lineage(cfg, Path(state_dir))
    return _compacted(cfg, model, processor, full, out_dir, t0)


def full_layers(cfg: CmoeConfig, state_dir: Path) -> set[int]:
    """The CMoE layers of the state at `state_dir` that hold `moe.max_experts_per_layer` experts, read from
    its manifest (nothing loaded: a flow asks before every probe)."""
    cap = cfg.moe.max_experts_per_layer
    if cap is None:
        return set()
    return {int(i) for i, origins in read_manifest(Path(state_dir))["experts"].items() if len(origins) >= cap}


def summary_line(result: CompactResult) -> str:
    """One line: experts per layer before and after, what was retired and merged, the parameters removed."""
    layers = ", ".join(f"layer {k} {n} -> {result.experts_after[k]}" for k, n in result.experts_before.items())
    return (f"{layers}; {result.retired} retired, {result.merged} merged; "
            f"{-result.params_added:,} parameters removed")


def room(cfg: CmoeConfig, model: torch.nn.Module) -> dict[int, int | None]:
    """Experts each CMoE layer may still add under `moe.max_experts_per_layer` (None: unbounded)."""
    cap = cfg.moe.max_experts_per_layer
    return {i: None if cap is None else max(cap - len(layer.experts), 0) for i, layer in cmoe_layers(model).items()}


def cap_plan(plan: dict[str, int], free: dict[int, int | None]) -> dict[str, int]:
    """An expansion plan ({layer: experts}) bounded by the room of each layer; layers left with none dropped."""
    capped = {k: n if free.get(int(k)) is None else min(n, free[int(k)]) for k, n in plan.items()}
    return {k: n for k, n in capped.items() if n > 0}


def _compacted(cfg: CmoeConfig, model: torch.nn.Module, processor, layers: set[int] | None, out_dir: Path,
               t0: float) -> CompactResult:
    """Compact `layers` (None: all) of the in-memory `model`, save it, and say what happened."""
    info = cmoe_info(model)
    data = {s.spec.name: encode_rows(s.spec, s.rows, processor, with_answers=False) for s in kept_eval_sets(cfg, model)}
    before = {i: len(layer.experts) for i, layer in cmoe_layers(model).items()}
    params_before = count_params(model).total
    acc_before = accuracy(cfg, model, processor, data)
    latest = dict(acc_before)

    def accept(_step: Step) -> tuple[bool, float]:
        acc = accuracy(cfg, model, processor, data)
        drop = max(acc_before[t] - acc[t] for t in acc)
        if drop <= cfg.compact.max_drop:
            latest.update(acc)
            return True, drop
        return False, drop

    def run(task: str) -> None:
        answer_task(model, processor, data[task], cfg, "single" if info.single_router else "oracle", task)

    measured = measure(model, run)
    nearest = {str(i): v for i, v in nearest_candidates(model, measured).items()}
    steps = plan_steps(model, measured, cfg.compact.min_use, cfg.compact.merge_similarity, layers)
    done = None if layers is None else (lambda: all(room(cfg, model)[i] for i in layers))
    compact(model, measured, steps, accept, done)
    record(model, steps)
    state = save_state(model, Path(out_dir) / "state", copy_base=True, overwrite=True)
    params_after = count_params(model).total
    kept = [s for s in steps if s.outcome == "kept"]
    return CompactResult(
        str(state), {str(i): n for i, n in before.items()},
        {str(i): len(layer.experts) for i, layer in cmoe_layers(model).items()}, [s.record() for s in steps],
        sum(s.kind == "retire" for s in kept), sum(s.kind == "merge" for s in kept), acc_before, latest,
        params_before, params_after, params_after - params_before, time.perf_counter() - t0, nearest)


def accuracy(cfg: CmoeConfig, model: torch.nn.Module, processor, data: dict[str, TaskData]) -> dict[str, float]:
    """Every task's accuracy on its kept set as users get it: locator routing (the shared router of a
    single-router model); oracle routing for a model without a locator, which cannot serve otherwise."""
    info = cmoe_info(model)
    mode = "single" if info.single_router else "locator" if set(info.tasks) <= set(info.locator.tasks) else "oracle"
    if not data:
        raise StageError("the state holds no task: nothing to compact")
    return {t: task_accuracy(answer_task(model, processor, d, cfg, mode, t if mode == "oracle" else None).answers, d)
            for t, d in data.items()}
