"""The model card: a version's description in the MLflow registry, as Markdown a reviewer reads.

Written when the candidate is registered (`card`) and given its decision when one is recorded
(`with_decision`, which replaces the card's last section): what the version learned and from
which data (hashes), its accuracy matrix, experts per layer, size, cost and routing KPIs, the
gate's verdict and metrics, the hardware it trained on, and who decided what and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmoe.stages.report import MISSING, Row, accuracy_table, cell

_DECISION = "<!-- cmoe:decision -->"  # everything after it is the decision section


@dataclass(frozen=True)
class CardFacts:
    """What a card says about one candidate (plain values: the flow gathers them from the stages)."""

    task: str
    parent_version: int | None
    bundle_uri: str
    bundle_sha256: str
    train_sha256: str | None
    eval_set: dict[str, Any] | None  # the task's kept evaluation set (EvalSetRef as JSON)
    tasks: list[str]  # columns of the accuracy matrix
    row_labels: list[str]  # one per matrix row: "v1 (color)", ..., "candidate"
    matrix: list[list[float | None]]
    metrics: dict[str, Any]  # headline: avg_acc, bwt, forgetting, locator_acc, ...
    experts: dict[str, dict[str, int]]  # {layer: {task that added them: experts}}
    kpis: dict[str, Any]  # cmoe.stages.kpi.TaskKpis as a dict
    gate_outcome: str
    gate_reasons: list[str]
    gate_metrics: dict[str, Any]
    learned: bool = True  # False: the candidate retired `task` (cmoe retire) instead of learning it


def card(facts: CardFacts) -> str:
    """The card of a candidate still waiting for its decision."""
    k = facts.kpis
    data = [f"- bundle: `{facts.bundle_uri}`", f"- bundle sha256: `{facts.bundle_sha256}`"] if facts.bundle_uri else []
    if facts.train_sha256:
        data.append(f"- train split sha256: `{facts.train_sha256}`")
    if facts.eval_set:
        data.append(f"- kept evaluation set: `{facts.eval_set['sha256']}` ({facts.eval_set['rows']} rows, "
                    f"`{facts.eval_set['uri']}`)")
    matrix = accuracy_table(["after"], facts.tasks, [Row([label], row) for label, row in
                                                     zip(facts.row_labels, facts.matrix)])
    headline = ", ".join(f"**{name}** {cell(facts.metrics.get(key))}" for name, key in
                         (("Avg", "avg_acc"), ("BWT", "bwt"), ("forgetting", "forgetting"),
                          ("locator accuracy", "locator_acc")))
    origins = list(dict.fromkeys(o for by in facts.experts.values() for o in by))
    experts = ["| layer | " + " | ".join(origins) + " | total |", "|" + "---|" * (len(origins) + 2)]
    experts += [f"| {layer} | " + " | ".join(str(by.get(o, 0)) for o in origins) + f" | {sum(by.values())} |"
                for layer, by in facts.experts.items()]
    walls = ", ".join(f"{stage} {s:.0f} s" for stage, s in k.get("wall_s", {}).items())
    kpis = [
        f"- parameters: {k['params_total']:,} total, {k['params_active']:,} active per token, "
        f"{k['params_added']:,} added by {facts.task}",
        f"- forward FLOPs per token: {k['flops_per_token']:,}",
        f"- mis-routed rows (locator): {cell(k.get('misrouting_pct'))} %",
        f"- predict latency: p50 {k['latency_p50_ms']:.1f} ms, p95 {k['latency_p95_ms']:.1f} ms (one request); "
        f"throughput {k['predict_samples_per_s']:.1f} rows/s (batched)",
        f"- wall time: {walls or MISSING}; {k['device_hours']:.4f} device-hours, "
        f"about {k['cost']:.2f} {k['currency']}",
    ]
    reasons = "\n".join(f"- {r}" for r in facts.gate_reasons) or "- (none)"
    gate_metrics = ", ".join(f"{name} {_value(v)}" for name, v in facts.gate_metrics.items())
    parent = f"v{facts.parent_version}" if facts.parent_version else "the base"
    return "\n\n".join([
        f"# {facts.task}\n\nA CMoE candidate that {'learned' if facts.learned else 'retired'} **{facts.task}** "
        f"on top of {parent}.",
        "## Data\n\n" + ("\n".join(data) or MISSING),
        "## Accuracy (locator routing, %)\n\n" + matrix.markdown() + "\n\n" + headline,
        "## Experts per layer (by the task that added them)\n\n" + "\n".join(experts),
        "## Size, cost and routing\n\n" + "\n".join(kpis),
        f"## Gate: {facts.gate_outcome}\n\n{reasons}\n\n{gate_metrics}",
        f"## Hardware\n\nexpansion on {k['device']} × {k['world_size']} process(es)",
        with_decision("", "pending_review", "", ""),
    ])


def with_decision(card_text: str, decision: str, by: str, reason: str) -> str:
    """`card_text` with its decision section (re)written: pending, or who decided what and why."""
    said = "**pending review**" if decision == "pending_review" else f"**{decision}** by **{by}**: {reason}"
    return f"{card_text.split(_DECISION)[0]}{_DECISION}\n## Decision\n\n{said}"


def _value(v: Any) -> str:
    return cell(v, ".2f") if isinstance(v, float) or v is None else str(v)
