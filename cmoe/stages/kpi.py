"""Per-task KPIs: what a candidate costs to run and to build, and how often it routes a row wrong.

From the evaluation report (sizes, routing, latency, measured on the kept evaluation sets) and the
stages' wall times: parameters total / active per token / added by the task, analytical forward
FLOPs per token, the mis-routing rate, predict latency p50 / p95 and throughput, wall time per
stage, device-hours and their estimated cost at `kpi.cost_per_device_hour`. Two plots go with
them: experts per layer across the lineage's tasks and compactions (cmoe.stages.growth: added,
merged, retired), and the locator's confusion matrix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cmoe.config import KpiConfig
from cmoe.stages.growth import GrowthEvent, growth_events

if TYPE_CHECKING:  # evaluate imports flops_per_token from here
    from cmoe.stages.evaluate import EvalReport


@dataclass
class TaskKpis:
    """The KPIs of one candidate; JSON-serialisable."""

    task: str
    params_total: int
    params_active: int  # per token: everything outside the CMoE layers + top-k experts and a router per layer
    params_added: int  # everything the task added: its experts, its router, its locator VAE
    flops_per_token: int  # forward pass, analytical (flops_per_token below)
    misrouting_pct: float | None  # kept evaluation rows the locator sent to another task's router; None: no locator
    latency_p50_ms: float  # one (image, question) request, batch of 1
    latency_p95_ms: float
    predict_samples_per_s: float  # batched prediction (eval.batch_size) over the kept evaluation sets
    wall_s: dict[str, float]  # per stage, as first computed (a resumed stage keeps its first time)
    device_hours: float  # per stage: wall time × the devices it held
    cost: float  # device_hours × kpi.cost_per_device_hour
    currency: str
    device: str  # where the expansion trained (e.g. cpu, cuda:0)
    world_size: int  # the expansion's processes
    growth_png: str
    confusion_png: str
    report_json: str


def flops_per_token(params_active: int, layers: int, hidden: int, context: float) -> int:
    """Forward FLOPs per token: 2 per active parameter (a multiply-add) plus attention's scores and
    weighted sum over `context` tokens in each of `layers` decoder layers of width `hidden`
    (Kaplan et al. 2020: 2N + 2 n_layer n_ctx d)."""
    return int(2 * params_active + 2 * layers * context * hidden)


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, linear between the nearest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def task_kpis(cfg: KpiConfig, task: str, params_added: int, report: EvalReport, wall_s: dict[str, float],
              devices: dict[str, int], device: str, out_dir: Path) -> TaskKpis:
    """The KPIs of the candidate that learned (or retired) `task`, adding `params_added` parameters,
    from its evaluation and its stages' wall times (`devices`: a stage's device count when not 1);
    writes kpi.json and the two plots into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_hours = sum(s * devices.get(stage, 1) for stage, s in wall_s.items()) / 3600
    kpis = TaskKpis(
        task=task, params_total=report.params_total, params_active=report.params_active,
        params_added=params_added, flops_per_token=report.flops_per_token,
        misrouting_pct=None if report.locator_acc is None else 100 - report.locator_acc,
        latency_p50_ms=percentile(report.latency_ms, 50), latency_p95_ms=percentile(report.latency_ms, 95),
        predict_samples_per_s=report.predict_samples_per_s, wall_s=wall_s, device_hours=device_hours,
        cost=device_hours * cfg.cost_per_device_hour, currency=cfg.currency, device=device,
        world_size=devices.get("expand", 1), growth_png=str(out_dir / "expert_growth.png"),
        confusion_png=str(out_dir / "locator_confusion.png") if report.confusion else "",
        report_json=str(out_dir / "kpi.json"),
    )
    Path(kpis.report_json).write_text(json.dumps(asdict(kpis), indent=2))
    plot_growth(growth_events(report.experts, report.tasks, report.compactions), Path(kpis.growth_png))
    if report.confusion:
        plot_confusion(report.confusion, report.tasks, Path(kpis.confusion_png))
    return kpis


def plot_growth(events: list[GrowthEvent], path: Path) -> None:
    """Experts per CMoE layer after each task and each compaction (cmoe.stages.growth): where the lineage
    grew, and where merges and retirements took experts out (a compaction's label says how many)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(events) + 3, 3.4))
    for layer in events[0].experts if events else []:
        ax.plot(range(len(events)), [e.experts[layer] for e in events], marker="o", label=f"layer {layer}")
    for x, e in enumerate(events):
        if e.kind == "compact":
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(events)), [_growth_label(e) for e in events], rotation=30, ha="right")
    ax.set_ylabel("experts")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _growth_label(event: GrowthEvent) -> str:
    if event.kind == "learn":
        return f"after {event.task}"
    return f"compacted: {sum(event.merged.values())} merged, {sum(event.retired.values())} retired"


def plot_confusion(confusion: list[list[int]], tasks: list[str], path: Path) -> None:
    """The locator's confusion matrix: kept evaluation rows of each task (rows) by the task they were routed to."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2, 0.8 * len(tasks) + 1.5))
    im = ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center")
    ax.set_xticks(range(len(confusion[0])), tasks[:len(confusion[0])], rotation=30, ha="right")
    ax.set_yticks(range(len(confusion)), tasks[:len(confusion)])
    ax.set_xlabel("routed to")
    ax.set_ylabel("true task")
    fig.colorbar(im, ax=ax, label="rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, headless
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
