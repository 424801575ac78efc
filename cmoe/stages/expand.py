"""Expansion: grow what the plan says, train it and task t's router, fit t's locator, save.

Everything that earlier tasks own stays frozen (and bit-identical); only task t's growth (a delta
of the base experts, or new experts) and its router train, with the load-balancing loss on that
router. The probes of the PGKE stage are the new experts' warm start, and their router columns
the router's either way; layers the plan does not expand still get t's router (trained too).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from cmoe.config import CmoeConfig
from cmoe.data.evalsets import EvalSetRef
from cmoe.data.validate import ValidatedBundle
from cmoe.model.cmoe_layer import (
    add_delta, add_expert, add_task, cmoe_info, drop_probes, load_delta_probe_state, load_probe_state, promote_probe,
    restart_router, train_all_experts, trainable_parameters,
)
from cmoe.model.inference import device_of
from cmoe.model.locator import drop_tokens, fit_task_vae, image_features, text_features
from cmoe.model.routing import route
from cmoe.model.state import save_state
from cmoe.stages.common import TaskData, load_train, moe_loss, open_lineage, record_task
from cmoe.stages.distributed import check_ranks_agree, on_rank0
from cmoe.stages.probe import ProbeReport
from cmoe.stages.trainer import TrainResult, TrainSpec, total_steps, train

Variant = Literal["cmoe", "single-router", "seq-ft"]
OnLog = Callable[[int, dict], None]  # the trainer's on_log: (step, {"loss", "lr", "samples_per_s"}), rank 0 only


@dataclass
class ExpandResult:
    """Where the new state is and what the expansion cost; JSON-serialisable."""

    task: str
    state_dir: str
    params_added: int
    train: dict
    locator: dict
    wall_s: float


def expansion_spec(cfg: CmoeConfig, name: str, out_dir: Path, lr: float | None = None) -> TrainSpec:
    """How the expansion of task `name` trains (resume checkpoints in out_dir/checkpoints; lr: expand.lr)."""
    return TrainSpec(epochs=cfg.expand.epochs, batch_size=cfg.expand.batch_size, lr=lr or cfg.expand.lr,
                     seed=cfg.expand.seed, deepspeed_config=cfg.expand.deepspeed_config,
                     checkpoint_dir=Path(out_dir) / "checkpoints", checkpoint_every=cfg.expand.checkpoint_every,
                     desc=f"expand {name}", log_every=cfg.expand.log_every)


def expansion_steps(cfg: CmoeConfig, train_rows: int) -> int:
    """Optimizer steps of an expansion on `train_rows` training examples (what a progress bar counts to)."""
    return total_steps(expansion_spec(cfg, "", Path()), train_rows)


def grow(model: torch.nn.Module, probe: ProbeReport, delta_rank: int) -> int:
    """Add the planned deltas or experts (these warm-started from the trained probes when there are any); params added."""
    before = sum(p.numel() for p in model.parameters())
    if probe.router_start is not None:  # where the probe started the task: the delta it inherits comes too
        restart_router(model, probe.router_start)
    if probe.growth == "delta" and probe.probe_file:  # the probe's delta and router are the warm start
        load_delta_probe_state(model, load_file(probe.probe_file), delta_rank, with_delta=bool(probe.plan))
    elif probe.growth == "delta":
        for key in probe.plan:
            add_delta(model, int(key), delta_rank)
    elif probe.probe_file:
        load_probe_state(model, load_file(probe.probe_file))
        for key, n in probe.plan.items():
            idx = promote_probe(model, int(key))
            for _ in range(n - 1):
                add_expert(model, int(key), init="copy", source=idx)
        # Layers left unexpanded keep the probe-trained router columns of their existing experts.
        drop_probes(model, keep_router=True)
    else:
        for key, n in probe.plan.items():
            for _ in range(n):
                add_expert(model, int(key), init="copy", source=0)
    return sum(p.numel() for p in model.parameters()) - before


def fit_locator(model: torch.nn.Module, processor, data: TaskData, cfg: CmoeConfig) -> dict:
    """Fit task t's VAE on the pre-MoE features of its training data (plus text-dropout copies); add it."""
    t0 = time.perf_counter()
    lc = cfg.locator
    # The locator sees what inference sees: image + prompt, never the answer tokens.
    prompts = [e.prompt() for e in data.encoded]
    gen = torch.Generator().manual_seed(cfg.expand.seed)  # the same copies on every rank and every run
    feats = []
    for i in range(0, len(prompts), cfg.eval.batch_size):
        b = processor.collate(prompts[i:i + cfg.eval.batch_size], left_pad=True, device=device_of(model))
        image = image_features(model, b)  # the image half is computed once per example
        masks = [b["attention_mask"]] + [drop_tokens(b["attention_mask"], lc.text_dropout, gen)
                                         for _ in range(lc.augment_copies)]
        feats += [torch.cat([image, text_features(model, b["input_ids"], m)], dim=-1).cpu() for m in masks]
    vae = fit_task_vae(torch.cat(feats), lc, seed=cfg.expand.seed)
    locator = cmoe_info(model).locator
    locator.temperature = lc.temperature
    locator.add_task(data.spec.name, vae.to(device_of(model)))
    return {"samples": len(data.encoded), "fit_rows": sum(len(f) for f in feats), "features": int(feats[0].shape[1]),
            "wall_s": time.perf_counter() - t0, "err_mean": float(vae.err_mean), "err_std": float(vae.err_std)}


def run_expand(
    cfg: CmoeConfig, bundle: ValidatedBundle, parent_state: Path | None, probe: ProbeReport | None, out_dir: Path,
    *, eval_set: EvalSetRef | None = None, copy_base: bool = True, variant: Variant = "cmoe",
    on_log: OnLog | None = None,
) -> ExpandResult:
    """Grow + train task `bundle` on the lineage at `parent_state`; write the new state to out_dir/state.

    The state records the task's provenance and `eval_set`, its kept evaluation set (what later
    evaluations re-test it on). `variant` selects the baselines that share this code:
    "single-router" (one shared router, experts grow by the plan, no locator) and "seq-ft" (no
    growth: every expert and the shared router are fine-tuned on each task in turn). `on_log`
    receives the training curve every `expand.log_every` steps.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    model, processor = open_lineage(cfg, parent_state, single_router=variant != "cmoe")
    name, added, result, locator = expand_model(cfg, model, processor, bundle, probe, out_dir, variant, eval_set,
                                                on_log)
    # Only rank 0 writes the state; the other ranks wait for it (a no-op in one process).
    state = on_rank0(lambda: save_state(model, out_dir / "state", copy_base=copy_base, overwrite=True),
                     default=out_dir / "state")
    return ExpandResult(name, str(state), added, asdict(result), locator, time.perf_counter() - t0)


def expand_model(
    cfg: CmoeConfig, model: torch.nn.Module, processor, bundle: ValidatedBundle, probe: ProbeReport | None,
    out_dir: Path, variant: Variant = "cmoe", eval_set: EvalSetRef | None = None, on_log: OnLog | None = None,
) -> tuple[str, int, TrainResult, dict]:
    """Add task `bundle` to the in-memory `model`: grow, train, fit its locator, record where it came
    from and its kept `eval_set`; (task, params added, training, locator)."""
    name = bundle.name
    if probe is not None and probe.task != name:
        raise ValueError(f"probe report is for task {probe.task!r}, bundle {bundle.uri} is {name!r}")
    data = load_train(cfg, bundle, model, processor)  # refused if the lineage learned this data before
    # New routers and experts draw from torch's global RNG: seed it, or the result depends on what
    # this process happened to draw before (and N ranks would not match one process).
    torch.manual_seed(cfg.expand.seed)
    add_task(model, name)
    record_task(model, bundle, eval_set)
    added = grow(model, probe, cfg.expand.delta_rank) if probe is not None else 0
    if variant == "seq-ft":  # the upcycled experts themselves train: their changes live only in memory
        train_all_experts(model)

    # A delta trains at its own rate: from zero, at low rank, 1e-3 is too slow for it (docs/method.md, 5b).
    delta = probe is not None and probe.growth == "delta" and bool(probe.plan)
    spec = expansion_spec(cfg, name, out_dir, cfg.expand.delta_lr if delta else None)
    with route(model, None if variant != "cmoe" else [name]):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad] if variant == "seq-ft" else trainable_parameters(model)
        result = train(model, params, data.encoded, processor.collate, moe_loss, spec, on_log=on_log)
        model.eval()
    check_ranks_agree(params, f"expand {name}")  # N processes (torchrun): every rank trained the same
    model.requires_grad_(False)
    locator = fit_locator(model, processor, data, cfg) if variant == "cmoe" else {}
    return name, added, result, locator
