"""PGKE probe: decide *when* task t needs to grow, and *where*, before paying for the expansion.

When: task t's new router starts from the earlier router that fits the task best (lowest held-out
loss; the task inherits the delta that router's task runs with) and trains alone over the experts
the lineage has, for a few steps; its held-out accuracy is what the lineage can do for the task.
Then the task's own delta (growth "delta") or a temporary probe expert, a trainable copy of the
layer's most-used expert ("experts"), is added to every CMoE layer and trained, with the router,
for a few steps more. If the router alone answers `probe.serves_at` % of the held-out rows, or the probes raise
the held-out accuracy by less than `probe.min_gain` points and lower its answer loss by less than
`probe.min_loss_drop` nats, the task is one the pool already serves: the plan is empty and the
expansion trains its router only.

Where: on the held-out slice of the same *training* split, each layer is scored by the share of
tokens whose top-k includes the probe; the layers with score >= tau_l grow, the highest scores
first, at most `probe.max_layer_share` of the layers and at least `probe.min_layer_share` of them
(the next-highest scores fill up), and always the best-scoring one. That is where new experts go
(`expand.growth: experts`); a delta (the default) goes in every layer of a task that grows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from cmoe.config import CmoeConfig
from cmoe.data.validate import ValidatedBundle
from cmoe.model.cmoe_layer import (
    BASE, add_delta, add_task, attach_probes, cmoe_info, cmoe_layers, delta_probe_state, probe_scores, probe_state,
    record_routing, restart_router, trainable_parameters,
)
from cmoe.model.inference import decode, device_of
from cmoe.model.processor import IGNORE, Encoded
from cmoe.model.routing import route
from cmoe.stages.common import TaskData, load_train, moe_loss, open_lineage, split_holdout
from cmoe.stages.compact import cap_plan, room
from cmoe.stages.metrics import score
from cmoe.stages.trainer import TrainResult, TrainSpec, train

PROBE_FILE = "probe.safetensors"  # trained probes + router: the expansion's warm start
# Held-out rows on which the earlier routers' losses are compared (the start router's choice): 32 per
# candidate while the lineage is short, then START_ROWS_TOTAL shared among the candidates (at least
# START_ROWS_MIN each), so the choice costs about the same at task 8 as at task 4. A router that fits
# the task stands out by nats, not hundredths (docs/method.md, choice 8): one batch tells.
START_ROWS_MAX, START_ROWS_MIN, START_ROWS_TOTAL = 32, 16, 128


@dataclass
class ProbeReport:
    """Per-layer probe scores and the expansion plan; JSON-serialisable."""

    task: str
    bundle_sha256: str
    tau: float  # threshold of the first CMoE layer (each layer's own is in scores)
    scores: dict[str, dict]  # layer -> {"share", "mass", "tau", "experts"}
    plan: dict[str, int]  # layer -> experts to add, or 1 for a delta (absent = none)
    params_to_add: int
    est_train_s: float  # estimated expansion time from the probe's measured throughput
    report_json: str
    chart_png: str
    probe_file: str | None  # None for a plan made without probing (naive-expand)
    train: dict | None = None
    # Held-out accuracy (percent) and answer loss of the router alone over the existing experts, then
    # with the probes; the probes' gain = acc_probes - acc_pool, in points; gain < probe.min_gain and
    # loss_pool - loss_probes < probe.min_loss_drop -> empty plan ("when"). None without probing.
    acc_pool: float | None = None
    acc_probes: float | None = None
    gain: float | None = None
    loss_pool: float | None = None
    loss_probes: float | None = None
    # The earlier router (a task's, or "base") the new one started from, and the held-out loss each gave.
    router_start: str | None = None
    start_losses: dict[str, float] | None = None
    # What the plan's layers grow (expand.growth): "experts", or "delta" (a change of the base experts).
    growth: str = "experts"


def threshold(cfg: CmoeConfig, experts_before: int) -> float:
    """tau_l: the configured value, or the uniform share k / (E_l + 1) with the probe counted."""
    tau = cfg.probe.tau if cfg.probe.tau is not None else cfg.moe.top_k / (experts_before + 1)
    return tau * cfg.probe.tau_scale


def needs_growth(cfg: CmoeConfig, gain: float, loss_drop: float, acc_pool: float) -> bool:
    """*When*: the pool does not serve the task (its router alone answers under serves_at % of the
    held-out rows) and the probes help, by min_gain points or min_loss_drop nats."""
    return acc_pool < cfg.probe.serves_at and (gain >= cfg.probe.min_gain or loss_drop >= cfg.probe.min_loss_drop)


def make_plan(cfg: CmoeConfig, scores: dict[int, dict], gain: float, loss_drop: float = 0.0,
              acc_pool: float = 0.0) -> dict[int, int]:
    """No layer when the router alone answers serves_at % of the held-out rows (`acc_pool`), or when the
    probes' accuracy gain (points) is below min_gain and their loss drop (nats) below min_loss_drop:
    the pool serves the task. Else the layers whose score reaches tau, the
    highest first, at most max_layer_share of them, and at least min_layer_share of them (and at
    least the best one: the task needs growth somewhere), the next-highest scores filling up; 1
    expert each (2 when >= ratio * tau)."""
    if not needs_growth(cfg, gain, loss_drop, acc_pool):
        return {}
    most = max(1, math.floor(cfg.probe.max_layer_share * len(scores)))
    least = min(most, max(1, math.floor(cfg.probe.min_layer_share * len(scores))))
    ranked = sorted(((s["share"], layer) for layer, s in scores.items()), reverse=True)
    chosen = [(share, layer) for share, layer in ranked if share >= scores[layer]["tau"]][:most]
    chosen += [r for r in ranked if r not in chosen][: max(0, least - len(chosen))]
    ratio = cfg.probe.double_expert_ratio
    return {layer: 2 if ratio is not None and share >= ratio * scores[layer]["tau"] else 1
            for share, layer in chosen}


def expert_size(model: torch.nn.Module) -> int:
    """Parameters of one expert (all experts share the dense MLP's shape)."""
    layer = next(iter(cmoe_layers(model).values()))
    return sum(p.numel() for p in layer.experts[0].parameters())


def run_probe(cfg: CmoeConfig, bundle: ValidatedBundle, parent_state: Path | None, out_dir: Path,
              on_log: Callable[[int, dict], None] | None = None) -> ProbeReport:
    """Train probes on task `bundle` over the lineage at `parent_state`; write report, chart, probes.
    `on_log` gets each phase's training curve, keys prefixed `probe_router/` and `probe/`."""
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
    fit, held = data.encoded.select(fit_idx), data.encoded.select(held_idx)  # encoded as the probe reads them

    start, start_losses = start_router(model, processor, held, cfg.eval.batch_size)

    def phase(steps: int, what: str, lr: float) -> tuple[TrainResult, float, float]:
        """Train what is trainable now for `steps`; (training, held-out loss, held-out accuracy)."""
        spec = TrainSpec(steps=steps, batch_size=cfg.probe.batch_size, lr=lr, seed=cfg.expand.seed,
                         deepspeed_config=cfg.expand.deepspeed_config, desc=f"{what} {name}",
                         log_every=cfg.expand.log_every)
        log = None if on_log is None else (
            lambda step, m: on_log(step, {f"{what.replace(' ', '_')}/{k}": v for k, v in m.items()}))
        model.train()
        trained = train(model, trainable_parameters(model), fit, processor.collate, moe_loss, spec, on_log=log)
        model.eval()
        with record_routing(model):  # the loss pass also counts where each layer's router sends tokens
            loss = heldout_loss(model, processor, held, cfg.eval.batch_size)
        return trained, loss, heldout_accuracy(model, processor, data, held_idx, cfg)

    delta = cfg.expand.growth == "delta"
    with route(model, [name]):
        # When, part 1: what the existing pool does for this task with a trained router.
        pool, loss_pool, acc_pool = phase(cfg.probe.router_steps, "probe router", cfg.probe.lr)
        if delta:  # the growth itself, briefly: the task's own delta in every layer, at its own rate
            delta_params = sum(add_delta(model, i, cfg.expand.delta_rank) for i in cmoe_layers(model))
        else:
            attach_probes(model)  # copies of the expert each layer's trained router leaned on most

        # When, part 2, and where: the probes train beside the router; how much do they help, where?
        result, loss_probes, acc_probes = phase(cfg.probe.steps, "probe", cfg.expand.delta_lr if delta else cfg.probe.lr)
    gain = acc_probes - acc_pool

    if delta:
        # A delta goes in every layer: at equal parameters that beat the probe's layers alone
        # (docs/method.md, 5b); there is no probe expert to score, and no expert to cap.
        scores = {i: {"share": None, "mass": None, "experts": len(layer.experts), "tokens": None,
                      "tau": threshold(cfg, len(layer.experts))} for i, layer in cmoe_layers(model).items()}
        grows = needs_growth(cfg, gain, loss_pool - loss_probes, acc_pool)
        plan = {layer: 1 for layer in scores} if grows else {}
        params_to_add = delta_params if grows else 0
        save_file(delta_probe_state(model), str(out_dir / PROBE_FILE))
    else:
        raw = probe_scores(model)  # the probes' shares, counted in phase 2's held-out loss pass
        scores = {i: {"share": s.share, "mass": s.mass, "experts": s.num_experts, "tokens": s.tokens,
                      "tau": threshold(cfg, s.num_experts)} for i, s in raw.items()}
        # a layer at moe.max_experts_per_layer grows only by the room its compaction made (cmoe.stages.compact)
        plan = cap_plan(make_plan(cfg, scores, gain, loss_pool - loss_probes, acc_pool), room(cfg, model))
        params_to_add = sum(plan.values()) * expert_size(model)
        save_file(probe_state(model), str(out_dir / PROBE_FILE))
    n_steps = cfg.expand.epochs * math.ceil(len(data.encoded) / cfg.expand.batch_size)
    est = n_steps * cfg.expand.batch_size / max(result.samples_per_s, 1e-9)

    report = ProbeReport(
        task=name, bundle_sha256=bundle.sha256, tau=scores[min(scores)]["tau"],
        acc_pool=acc_pool, acc_probes=acc_probes, gain=gain, loss_pool=loss_pool, loss_probes=loss_probes,
        router_start=start, start_losses=start_losses,
        scores={str(k): v for k, v in scores.items()}, plan={str(k): v for k, v in plan.items()},
        params_to_add=params_to_add, est_train_s=est, report_json=str(out_dir / "probe.json"),
        chart_png=str(out_dir / "probe.png"), probe_file=str(out_dir / PROBE_FILE),
        train={**asdict(result), "router_only": asdict(pool)}, growth=cfg.expand.growth,
    )
    Path(report.report_json).write_text(json.dumps(asdict(report), indent=2))
    plot_scores(report, Path(report.chart_png))
    return report


def start_router(model: torch.nn.Module, processor, held: Sequence[Encoded], batch_size: int) -> tuple[str, dict[str, float]]:
    """Start the new task's router from the earlier router (each task's, and the base's) under which
    its held-out loss is lowest: a task the lineage knows starts where its skill is [8]. (start, losses)."""
    info = cmoe_info(model)
    name, losses = info.current_task, {}
    sources = [BASE, *info.tasks[:-1]]
    rows = held[:start_rows(len(sources))]
    with route(model, [name]):
        for source in sources:
            restart_router(model, source)
            losses[source] = heldout_loss(model, processor, rows, batch_size)
        best = min(losses, key=losses.__getitem__)
        restart_router(model, best)
    return best, losses


def start_rows(candidates: int) -> int:
    """Held-out rows each candidate start router is scored on: START_ROWS_TOTAL shared, within [MIN, MAX]."""
    return max(START_ROWS_MIN, min(START_ROWS_MAX, START_ROWS_TOTAL // candidates))


def heldout_accuracy(model: torch.nn.Module, processor, data: TaskData, idx: list[int], cfg: CmoeConfig) -> float:
    """Percent of the held-out rows `idx` answered right (greedy, scored by the task's metric)."""
    preds = decode(model, processor, [data.encoded[i].prompt() for i in idx], batch_size=cfg.eval.batch_size,
                   max_new_tokens=cfg.eval.max_new_tokens).answers
    return 100 * sum(score(p, data.answers[i], data.spec.metric) for p, i in zip(preds, idx)) / max(len(idx), 1)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, processor, examples: list, batch_size: int) -> float:
    """Mean LM loss per answer token over `examples` (the probe's held-out slice)."""
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = processor.collate(examples[i:i + batch_size], device=device_of(model))
        n = int((batch["labels"][:, 1:] != IGNORE).sum())  # HF shifts labels by one: the tokens it scores
        total += float(model(**batch).loss) * n
        tokens += n
    return total / max(tokens, 1)


def plot_scores(report: ProbeReport, path: Path) -> None:
    """Bar chart of per-layer probe share against each layer's threshold; for a delta probe (no share),
    the held-out accuracy of the router alone and with the probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report.scores)
    fig, ax = plt.subplots(figsize=(max(4, len(layers) * 0.8), 3))
    if report.growth == "delta":
        ax.bar(["router alone", "with the delta"], [report.acc_pool or 0.0, report.acc_probes or 0.0],
               color=["tab:gray", "tab:orange" if report.plan else "tab:gray"])
        ax.set_ylabel("held-out accuracy %")
        ax.set_ylim(0, 100)
        ax.set_title(f"{report.task}: {'a delta in every layer' if report.plan else 'grows nothing'}")
    else:
        shares = [report.scores[k]["share"] for k in layers]
        taus = [report.scores[k]["tau"] for k in layers]
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
