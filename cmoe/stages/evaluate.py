"""Evaluation: re-test every task learned so far, task-agnostically, and measure forgetting.

Every task is re-tested on its *kept evaluation set* (its test split, kept by the lineage when it
was learned; see cmoe.data.evalsets), never on its bundle, so old bundles may be deleted. Each set
is answered twice with batched greedy decoding: with locator routing (PTL picks the router; what
users get) and with oracle routing (the true task's router), so locator errors and expert errors
can be told apart. The accuracy-matrix row of this step is combined with the lineage's earlier rows
into Avg (= MFN), MFT, BWT, Forgetting and MAA (formulas in cmoe/stages/metrics.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmoe.config import CmoeConfig
from cmoe.model.cmoe_layer import cmoe_info, cmoe_layers
from cmoe.model.inference import Decoded, decode
from cmoe.model.params import count_params
from cmoe.model.routing import RoutingMode
from cmoe.stages import metrics
from cmoe.data.evalsets import EvalSet
from cmoe.stages.common import StageError, TaskData, encode_rows, kept_eval_sets, open_lineage
from cmoe.stages.kpi import flops_per_token

LATENCY_REQUESTS = 32  # single-row predictions timed per evaluation, spread over the kept sets


@dataclass
class EvalReport:
    """One row of the accuracy matrix plus the continual metrics; JSON-serialisable."""

    tasks: list[str]
    acc: dict[str, float]  # per task, locator routing (or the model's only routing), percent
    oracle_acc: dict[str, float] | None  # per task, true task's router; None for single-router models
    locator_acc: float | None  # percent of test samples routed to their own task
    confusion: list[list[int]] | None  # [true task][located task] counts
    matrix: list[list[float | None]]  # the lineage's accuracy matrix up to this step
    avg_acc: float  # = MFN, the mean final accuracy
    mft: float | None  # mean accuracy of each task right after it was learned (diagonal)
    bwt: float | None
    forgetting: float | None
    maa: float | None
    params_total: int
    params_active: int
    params_added: list[int]  # per task, in order
    eval_samples_per_s: float
    report_json: str
    heatmap_png: str
    # What the KPIs (cmoe.stages.kpi) need of the model: {layer: {task that added them: experts}},
    # forward FLOPs per token, per-request predict latency (ms, batch of 1) on the first rows of each
    # kept set, and the batched prediction's throughput (rows/s).
    experts: dict[str, dict[str, int]] = field(default_factory=dict)
    flops_per_token: int = 0
    latency_ms: list[float] = field(default_factory=list)
    predict_samples_per_s: float = 0.0
    # Per task, each kept-set row's locator margin (best minus second-best task probability) under
    # locator routing: the gate's share of unsure rows; empty for single-router models.
    locator_margin: dict[str, list[float]] = field(default_factory=dict)
    # The state's compaction history (what each compaction merged and retired): the growth plot's other half.
    compactions: list[dict] = field(default_factory=list)


def answer_task(model: torch.nn.Module, processor, data: TaskData, cfg: CmoeConfig, mode: RoutingMode,
                task: str | None) -> Decoded:
    """Greedy answers for a task's test split under `mode`; under locator routing also the located
    task and the locator's margin per sample."""
    return decode(model, processor, data.encoded, mode=mode, task=task, batch_size=cfg.eval.batch_size,
                  max_new_tokens=cfg.eval.max_new_tokens)


def task_accuracy(preds: list[str], data: TaskData) -> float:
    """Mean score of the predictions by the task's metric, in percent."""
    return 100 * sum(metrics.score(p, a, data.spec.metric) for p, a in zip(preds, data.answers)) / len(preds)


def run_evaluate(cfg: CmoeConfig, state_dir: Path, out_dir: Path, history: list[dict[str, float]]) -> EvalReport:
    """Evaluate the state at `state_dir` on every task it has learned, from the kept evaluation sets.

    `history` holds the lineage's earlier accuracy rows (one per earlier task, in order); missing
    rows leave their matrix cells unknown (Avg is still the final row's mean).
    """
    model, processor = open_lineage(cfg, Path(state_dir))
    return evaluate_model(cfg, model, processor, kept_eval_sets(cfg, model), out_dir, history)


@torch.no_grad()
def evaluate_model(cfg: CmoeConfig, model: torch.nn.Module, processor, eval_sets: list[EvalSet], out_dir: Path,
                   history: list[dict[str, float]]) -> EvalReport:
    """Evaluate an in-memory CMoE model on every evaluation set (all tasks so far, in order)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = cmoe_info(model)
    single = info.single_router
    if not single and (missing := [t for t in info.tasks if t not in info.locator.tasks]):
        # Oracle routing would need the task label users do not have: reporting it as the
        # task-agnostic accuracy would be a lie.
        raise StageError(f"tasks {missing} have no locator VAE: this model cannot route without task labels")
    t0, n = time.perf_counter(), 0
    acc: dict[str, float] = {}
    oracle: dict[str, float] | None = None if single else {}
    names: list[str] = []
    located_all: list[tuple[str, str]] = []
    margins: dict[str, list[float]] = {}
    served = "single" if single else "locator"  # how users' rows are routed
    predict_s, latency_ms, prompt_tokens = 0.0, [], []
    for eval_set in eval_sets:
        data = encode_rows(eval_set.spec, eval_set.rows, processor, with_answers=False)
        name = data.spec.name
        if name not in info.tasks:
            raise StageError(f"evaluation set of task {name!r}: this state never learned it (tasks: {info.tasks})")
        names.append(name)
        n += len(data.encoded)
        prompt_tokens += [len(e.input_ids) for e in data.encoded]
        if not single:
            oracle[name] = task_accuracy(answer_task(model, processor, data, cfg, "oracle", name).answers, data)
        t_predict = time.perf_counter()
        out = answer_task(model, processor, data, cfg, served, None)
        predict_s += time.perf_counter() - t_predict
        acc[name] = task_accuracy(out.answers, data)
        if out.located is not None:
            located_all += [(name, t) for t in out.located]
            margins[name] = out.margin
        latency_ms += request_latency_ms(model, processor, data, cfg, served, max(1, LATENCY_REQUESTS // len(eval_sets)))
    wall = time.perf_counter() - t0 - sum(latency_ms) / 1000

    confusion = None
    locator_acc = None
    if located_all:
        idx = {t: i for i, t in enumerate(info.tasks)}
        confusion = [[0] * len(info.tasks) for _ in names]
        for true, got in located_all:
            confusion[names.index(true)][idx[got]] += 1
        locator_acc = 100 * sum(t == g for t, g in located_all) / len(located_all)

    matrix = _matrix(history, acc, names)
    counts = count_params(model)
    report = EvalReport(
        tasks=names, acc=acc, oracle_acc=oracle, locator_acc=locator_acc, confusion=confusion, matrix=matrix,
        avg_acc=metrics.avg_acc(matrix), mft=metrics.mft(matrix), bwt=metrics.bwt(matrix),
        forgetting=metrics.forgetting(matrix), maa=metrics.maa(matrix), params_total=counts.total,
        params_active=counts.active_per_token, params_added=[counts.added_per_task.get(t, 0) for t in info.tasks],
        eval_samples_per_s=n * (1 if single else 2) / wall,
        report_json=str(out_dir / "eval.json"), heatmap_png=str(out_dir / "accuracy.png"),
        experts=experts_per_layer(model), latency_ms=latency_ms, predict_samples_per_s=n / predict_s,
        locator_margin=margins, compactions=list(info.compactions),
        flops_per_token=flops_per_token(
            counts.active_per_token, model.config.text_config.num_hidden_layers, model.config.text_config.hidden_size,
            # the prompt (image tokens included) and the answer, on average half-way through it
            sum(prompt_tokens) / len(prompt_tokens) + cfg.eval.max_new_tokens / 2),
    )
    Path(report.report_json).write_text(json.dumps(asdict(report), indent=2))
    plot_matrix(matrix, names, Path(report.heatmap_png))
    return report


def request_latency_ms(model: torch.nn.Module, processor, data: TaskData, cfg: CmoeConfig, mode: RoutingMode,
                       rows: int) -> list[float]:
    """Milliseconds of one-row predictions (what one serving request waits) on the first `rows` rows."""
    times = []
    for e in data.encoded[:rows]:
        t0 = time.perf_counter()
        decode(model, processor, [e], mode=mode, batch_size=1, max_new_tokens=cfg.eval.max_new_tokens)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def experts_per_layer(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """{CMoE layer: {task that added them ("base" for the upcycled copies): experts}}, in the order they came."""
    found: dict[str, dict[str, int]] = {}
    for i, layer in cmoe_layers(model).items():
        by = found.setdefault(str(i), {})
        for origin in layer.expert_origin:
            by[origin] = by.get(origin, 0) + 1
    return found


def _matrix(history: list[dict[str, float]], final: dict[str, float], names: list[str]) -> list[list[float | None]]:
    """Earlier accuracy rows + this step's as a lower-triangular matrix over `names`: one row per
    task, the last one this step's; rows the history lacks stay unknown (None)."""
    rows = (history + [{}] * len(names))[: len(names) - 1] + [final]
    return [[row.get(t) if j <= i else None for j, t in enumerate(names)] for i, row in enumerate(rows)]


def plot_matrix(matrix: list[list[float | None]], names: list[str], path: Path) -> None:
    """Heatmap of the accuracy matrix (rows: after task i; columns: task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array([[np.nan if a is None else a for a in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 0.9 * len(matrix) + 1.5))
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(m):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), [f"after {names[i]}" for i in range(len(matrix))])
    fig.colorbar(im, ax=ax, label="accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
