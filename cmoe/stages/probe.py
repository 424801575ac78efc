"""PGKE probe: decide *where* task t needs new experts before paying for the expansion.

A temporary probe expert (a trainable copy of the layer's most-used expert) is attached to every
CMoE layer and trained briefly, together with task t's new router, on a slice of task t's training
data. On a held-out slice of the same *training* split, each layer is scored by the share of
tokens whose top-k includes the probe: a router that sends many tokens to the probe says the
existing experts do not serve this task there. Layer l is expanded iff score >= tau_l.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from cmoe.config import CmoeConfig
from cmoe.data.validate import ValidatedBundle
from cmoe.model.cmoe_layer import (
    add_task, attach_probes, cmoe_info, cmoe_layers, probe_scores, probe_state, record_routing, trainable_parameters,
)
from cmoe.model.inference import device_of
from cmoe.model.routing import route
from cmoe.stages.common import load_train, moe_loss, open_lineage, split_holdout
from cmoe.stages.trainer import TrainSpec, train

PROBE_FILE = "probe.safetensors"  # trained probes + router: the expansion's warm start


@dataclass
class ProbeReport:
    """Per-layer probe scores and the expansion plan; JSON-serialisable."""

    task: str
    bundle_sha256: str
    tau: float  # threshold of the first CMoE layer (each layer's own is in scores)
    scores: dict[str, dict]  # layer -> {"share", "mass", "tau", "experts"}
    plan: dict[str, int]  # layer -> experts to add (absent = none)
    params_to_add: int
    est_train_s: float  # estimated expansion time from the probe's measured throughput
    report_json: str
    chart_png: str
    probe_file: str | None  # None for a plan made without probing (naive-expand)
    train: dict | None = None


def threshold(cfg: CmoeConfig, experts_before: int) -> float:
    """tau_l: the configured value, or the uniform share k / (E_l + 1) with the probe counted."""
    tau = cfg.probe.tau if cfg.probe.tau is not None else cfg.moe.top_k / (experts_before + 1)
    return tau * cfg.probe.tau_scale


def make_plan(cfg: CmoeConfig, scores: dict[int, dict]) -> dict[int, int]:
    """Layers whose score reaches tau get 1 expert (2 when >= ratio * tau), capped per task."""
    chosen = sorted((s["share"], layer) for layer, s in scores.items() if s["share"] >= s["tau"])
    chosen.reverse()  # highest score first, so a cap keeps the layers that need it most
    if cfg.probe.max_layers_per_task is not None:
        chosen = chosen[: cfg.probe.max_layers_per_task]
    ratio = cfg.probe.double_expert_ratio
    return {layer: 2 if ratio is not None and share >= ratio * scores[layer]["tau"] else 1
            for share, layer in chosen}


def expert_size(model: torch.nn.Module) -> int:
    """Parameters of one expert (all experts share the dense MLP's shape)."""
    layer = next(iter(cmoe_layers(model).values()))
    return sum(p.numel() for p in layer.experts[0].parameters())


def run_probe(cfg: CmoeConfig, bundle: ValidatedBundle, parent_state: Path | None, out_dir: Path) -> ProbeReport:
    """Train probes on task `bundle` over the lineage at `parent_state`; write report, chart, probes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = open_lineage(cfg, parent_state)
    name = bundle.name
    data = load_train(cfg, bundle, model, processor)  # refused if the lineage learned this data before
    # The new router's columns (and the probes' router columns) draw from torch's global RNG: seed
    # it as the expansion does, or the plan depends on what this process drew before.
    torch.manual_seed(cfg.expand.seed)
    add_task(model, name)
    fit_idx, held_idx = split_holdout(len(data.encoded), cfg.probe.holdout_fraction, cfg.expand.seed)
    fit = [data.encoded[i] for i in fit_idx]
    held = [data.encoded[i] for i in held_idx]

    with route(model, [name]), torch.no_grad(), record_routing(model):
        _forward_all(model, processor, held[: 4 * cfg.probe.batch_size], cfg.probe.batch_size)
    attach_probes(model)  # copies of each layer's most-used expert under the new router

    spec = TrainSpec(steps=cfg.probe.steps, batch_size=cfg.probe.batch_size, lr=cfg.probe.lr,
                     seed=cfg.expand.seed, deepspeed_config=cfg.expand.deepspeed_config, desc=f"probe {name}")
    with route(model, [name]):
        model.train()
        result = train(model, trainable_parameters(model), fit, processor.collate, moe_loss, spec)
        model.eval()
        with torch.no_grad(), record_routing(model):
            _forward_all(model, processor, held, cfg.probe.batch_size)
    raw = probe_scores(model)

    scores = {i: {"share": s.share, "mass": s.mass, "experts": s.num_experts, "tokens": s.tokens,
                  "tau": threshold(cfg, s.num_experts)} for i, s in raw.items()}
    plan = make_plan(cfg, scores)
    per_expert = expert_size(model)
    params_to_add = sum(plan.values()) * per_expert
    n_steps = cfg.expand.epochs * math.ceil(len(data.encoded) / cfg.expand.batch_size)
    est = n_steps * cfg.expand.batch_size / max(result.samples_per_s, 1e-9)

    save_file(probe_state(model), str(out_dir / PROBE_FILE))
    report = ProbeReport(
        task=name, bundle_sha256=bundle.sha256, tau=scores[min(scores)]["tau"],
        scores={str(k): v for k, v in scores.items()}, plan={str(k): v for k, v in plan.items()},
        params_to_add=params_to_add, est_train_s=est, report_json=str(out_dir / "probe.json"),
        chart_png=str(out_dir / "probe.png"), probe_file=str(out_dir / PROBE_FILE), train=asdict(result),
    )
    Path(report.report_json).write_text(json.dumps(asdict(report), indent=2))
    plot_scores(report, Path(report.chart_png))
    return report


@torch.no_grad()
def _forward_all(model: torch.nn.Module, processor, examples: list, batch_size: int) -> None:
    for i in range(0, len(examples), batch_size):
        model(**processor.collate(examples[i:i + batch_size], device=device_of(model)))


def plot_scores(report: ProbeReport, path: Path) -> None:
    """Bar chart of per-layer probe share against each layer's threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report.scores)
    shares = [report.scores[k]["share"] for k in layers]
    taus = [report.scores[k]["tau"] for k in layers]
    fig, ax = plt.subplots(figsize=(max(4, len(layers) * 0.8), 3))
    colors = ["tab:orange" if k in report.plan else "tab:gray" for k in layers]
    ax.bar(layers, shares, color=colors)
    ax.scatter(layers, taus, marker="_", s=400, color="black", label="tau")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("probe share of top-k")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.task}: expand {', '.join(report.plan) or 'none'}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def naive_plan(cfg: CmoeConfig, bundle: ValidatedBundle, parent_state: Path | None, out_dir: Path) -> ProbeReport:
    """The naive-expand baseline's plan: one new expert in every CMoE layer, no probe."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, _ = open_lineage(cfg, parent_state)
    plan = {str(i): 1 for i in cmoe_layers(model)}
    report = ProbeReport(
        task=bundle.name, bundle_sha256=bundle.sha256,
        tau=0.0, scores={}, plan=plan, params_to_add=len(plan) * expert_size(model), est_train_s=0.0,
        report_json=str(out_dir / "probe.json"), chart_png="", probe_file=None,
    )
    Path(report.report_json).write_text(json.dumps(asdict(report), indent=2))
    return report
