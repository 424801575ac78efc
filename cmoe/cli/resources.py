"""`cmoe plan-resources`: what each stage needs (parameters, memory, GPUs) before any money is spent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table

from cmoe.cli.common import ConfigOpt, console, fail, load

if TYPE_CHECKING:
    from cmoe.model.sizing import ResourcePlan, StagePlan, TrainingSetup


def plan_resources(
    base: Annotated[Path | None, typer.Option(
        "--base", help="HF LLaVA folder; only its config.json is read (default: base.path, else the tiny default).")] = None,
    text_tokens: Annotated[int, typer.Option(min=1, help="Text tokens per sample (question + answer).")] = 64,
    learned_tasks: Annotated[int, typer.Option(
        min=0, help="Tasks already in the lineage, each with the most experts a plan allows.")] = 0,
    gpus: Annotated[int | None, typer.Option(
        min=1, help="Also show the expansion's memory per GPU on this many ranks (nproc_per_node x hosts).")] = None,
    device: Annotated[Literal["gpu", "cpu"], typer.Option(
        help="Which variant of expand.deepspeed_config to plan for (GPU: bf16 autocast; CPU: fp32).")] = "gpu",
    config: ConfigOpt = None,
) -> None:
    """Per stage: parameters, optimizer / gradient / activation memory, and the fewest GPUs it fits on (no training)."""
    cfg = load(config)
    from cmoe.model.sizing import SizingError, plan_resources as plan, read_base_config, training_setup
    from cmoe.stages.trainer import resolve_config

    device_type = "cuda" if device == "gpu" else "cpu"

    def setup(name: str | None) -> TrainingSetup:
        path = resolve_config(name, device_type)
        return training_setup(json.loads(path.read_text()), f"{name or 'zero0'} -> {path.name}")

    folder = base or (Path(cfg.base.path) if cfg.base.path else None)
    try:
        continual = setup(cfg.expand.deepspeed_config)
        # The tiny default is built by `cmoe base build`, whose trainings use the default config (zero0).
        result = plan(read_base_config(folder) if folder else None, cfg, continual,
                      None if folder else setup(None), text_tokens=text_tokens, learned_tasks=learned_tasks,
                      source=str(folder) if folder else "the tiny default (config base section)")
    except (SizingError, FileNotFoundError) as err:
        raise fail(err) from None
    _print_plan(result, cfg.moe, continual, gpus)


def _print_plan(plan: ResourcePlan, moe, setup: TrainingSetup, gpus: int | None) -> None:  # noqa: ANN001 - MoEConfig
    """The plan's header lines, one table row per stage, the GPUs a whole task needs (and what `gpus` ranks hold)."""
    from cmoe.model.sizing import GPUS, HEADROOM

    s = plan.shape
    console.print(f"base: [bold]{plan.source}[/]: {s['text']} text {s['text_hidden']} x {s['text_layers']} layers "
                  f"(MLP {s['text_intermediate']}, {s['text_heads']} heads / {s['kv_heads']} kv, vocab {s['vocab']}); "
                  f"vision {s['vision_hidden']} x {s['vision_layers']} layers, {s['image_size']} px / "
                  f"{s['patch_size']} px patches; dense {_count(s['dense_params'])} params")
    console.print(f"CMoE: layers {moe.layers}, E0 {moe.initial_experts}, top-{moe.top_k}; one expert "
                  f"{_count(plan.per_expert)} params; a task adds at most {plan.experts_per_task} experts "
                  f"({_count(plan.experts_per_task * plan.per_expert)})")
    console.print(f"sequence: {plan.image_tokens} image tokens + {plan.text_tokens} text = "
                  f"{plan.image_tokens + plan.text_tokens} tokens per sample")
    console.print(f"training: {setup.source}: ZeRO-{setup.zero_stage}, {setup.precision.name}, "
                  f"gradient accumulation {setup.grad_accum}, gradient checkpointing "
                  f"{'on' if plan.gradient_checkpointing else 'off'}; evaluation: {plan.base_dtype}, one process")
    console.print(f"base weights: {plan.base_dtype} (base.dtype); the experts and routers a task trains: float32")
    table = Table("stage", "batch", "seq", "params", "trainable", "weights GiB", "grads GiB", "optimizer GiB",
                  "activations GiB/sample", title="memory per stage, unpartitioned (one GPU, no ZeRO split)")
    fits = Table("stage", *(f"on {g} GPUs" for g in GPUS), *([f"on {gpus} ranks"] if gpus else []),
                 title=f"smallest setup per GPU class (fewest GPUs, then gradient accumulation; at most "
                       f"{HEADROOM:.0%} of a GPU) and GiB per GPU")
    for stage in plan.stages:
        table.add_row(stage.stage, str(stage.batch_size), str(stage.seq_len), _count(stage.params_total),
                      _count(stage.trainable), _gib(stage.weights_bytes + stage.weight_copies_bytes),
                      _gib(stage.grads_bytes), _gib(stage.optimizer_bytes), _gib(stage.activation_bytes_per_sample))
        fits.add_row(stage.stage, *(_setup(stage, cap) for cap in GPUS.values()), *([_on(stage, gpus)] if gpus else []))
    console.print(table)
    console.print(fits)
    if any(st.weight_copies_bytes for st in plan.stages):
        console.print("weights include the bf16 copies autocast keeps for the backward of every fp32 weight "
                      "it passes (2 bytes per parameter)")
    task = [st for st in plan.stages if not st.stage.startswith("base")]
    for gpu, cap in GPUS.items():
        fits = [st.smallest(cap) for st in task]
        n = None if None in fits else max(f[0] for f in fits)
        need = "does not fit" if n is None else f"{n} GPU{'s' if n > 1 else ''}"
        console.print(f"one task (probe, expansion, evaluation) on {gpu} GPUs: [bold]{need}[/]")


def _setup(stage: StagePlan, capacity: int) -> str:
    """'N GPUs, accum A, micro M: X GiB' (per GPU), or why none fits."""
    from cmoe.model.sizing import HEADROOM, WORLD_SIZES

    fit = stage.smallest(capacity)
    if fit is None:
        replicated = stage.weights_bytes + stage.weight_copies_bytes  # ZeRO <= 2 splits no weight
        if replicated > HEADROOM * capacity:
            return f"no: weights alone {replicated / 2**30:.1f} GiB"
        return f"no: not on {WORLD_SIZES[-1]} GPUs" if stage.distributed else "no: not on one GPU (one process)"
    world, accum = fit
    need = sum(stage.per_gpu(world, accum).values()) / 2**30
    micro = stage.batch_size // (world * accum)
    return f"{world} GPU{'s' if world > 1 else ''}, accum {accum}, micro {micro}: {need:.1f} GiB" if stage.setup \
        else f"1 GPU: {need:.1f} GiB"


def _on(stage: StagePlan, world: int) -> str:
    """Memory per GPU of `stage` on `world` ranks with the DeepSpeed config's accumulation."""
    if not stage.distributed:
        return "one process"
    accum = stage.setup.grad_accum  # a distributed stage trains: it has a setup
    need = stage.per_gpu(world)
    if need is None:
        return f"no: batch {stage.batch_size} is not {world} x {accum} x micro"
    return f"micro {stage.batch_size // (world * accum)}: {sum(need.values()) / 2**30:.1f} GiB"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _count(n: int) -> str:
    """7.06 B, 135.3 M, 395.8 K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(n)
