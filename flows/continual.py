"""Prefect flow `continual_task`: teach the champion one new task, then let the gate decide.

One task bundle goes through five stages, each a Prefect task that calls one plain function of
`cmoe.stages` and publishes what it found as a Prefect artifact:

    fetch          validate + download the bundle, once (retried on transient I/O errors)
    keep-eval-set  keep the task's evaluation set (its test split) in the lineage's store
    make-room      a layer at `moe.max_experts_per_layer` is compacted first (cmoe/stages/compact.py)
    probe          PGKE: which layers need new experts            -> artifact `cmoe-probe`
    expand         train the new experts, the task router and its locator VAE -> `cmoe-expand-progress`
    evaluate       re-test every task learned so far on the kept evaluation sets -> `cmoe-accuracy`
    kpi            size, FLOPs, latency, mis-routing, wall time, device-hours and cost -> `cmoe-kpi`
    gate           register the candidate (its model card), approve / reject / ask a reviewer -> `cmoe-decision`

The flow run links to its MLflow run (`cmoe-mlflow-run`: the config, the probe's and the
expansion's training curves, the expansion's system metrics, the bundle as the dataset input) and
to the model version it registered (`cmoe-model-version`: the model card).

Once the version is decided, cmoe's local copies of the task's training data are deleted: the
lineage keeps evaluation sets, never training data, and no later task reads this bundle again
(docs/data-lifecycle.md).

The candidate always builds on the MLflow `champion`. Each stage writes into
`<home>/runs/<bundle sha256>-<parent>-<config hash>/<stage>/` and marks itself finished with
`done.json`, so a failed or killed run, started again for the same bundle and champion under a
config with the same results (`stage_key`), resumes at the first stage that did not finish. A
review (and, with `review_plan: true`, the expansion plan after the probe) waits for one answer,
from the Prefect UI or `cmoe review approve|reject`: see `flows/review.py`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from prefect import State, Task, flow, task
from prefect.artifacts import (
    create_link_artifact, create_markdown_artifact, create_progress_artifact, create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import flow_run

from cmoe.config import CmoeConfig, load_config
from cmoe.data.bundle import BundleError
from cmoe.data.evalsets import EvalSetRef
from cmoe.data.guard import check_not_learned
from cmoe.data.loading import forget_local_copies
from cmoe.data.storage import StorageError
from cmoe.data.validate import ValidatedBundle, open_bundle
from cmoe.files import write_text_atomic
from cmoe.registry import EVAL_SET_TAG, REMOVED_TAG, TRAIN_SHA_TAG, Champion, Registry, VersionInfo, held_versions
from cmoe.registry.model_card import CardFacts, card
from cmoe.stages.report import Row, accuracy_table, cell
from flows.lineage_slot import lineage_slot
from flows.review import review_plan, settle

if TYPE_CHECKING:  # the stages (torch, DeepSpeed) are imported inside the tasks that run them
    from cmoe.stages.evaluate import EvalReport
    from cmoe.stages.expand import ExpandResult
    from cmoe.stages.kpi import TaskKpis
    from cmoe.stages.probe import ProbeReport

T = TypeVar("T")
DONE = "done.json"  # written last into a stage's folder: the stage finished and this is its result
WALL_KEY = "cmoe_wall_s"  # beside the result in done.json: how long computing it took (for the KPIs)

# Every stage task persists its result as JSON (readable back from the Prefect API) and skips
# Prefect's input caching: resuming is the job of the stage's own done.json, which survives the
# loss of the Prefect database and is keyed by what matters (bundle and champion).
stage_task = partial(task, cache_policy=NO_CACHE, persist_result=True, result_serializer="json")


@dataclass
class GateResult:
    """The registered candidate and what the automatic gate made of it."""

    version: int
    outcome: Literal["approve", "reject", "review"]
    reasons: list[str]
    metrics: dict[str, Any]


@dataclass
class TaskOutcome:
    """What one task arrival produced: the version, the decision and the headline metrics."""

    task: str
    bundle_sha256: str
    parent_version: int | None
    version: int | None  # None when the expansion plan was rejected
    decision: str  # approved / rejected / plan_rejected
    decided_by: str
    reason: str
    acc: dict[str, float]  # per task learned so far, percent
    avg_acc: float | None
    bwt: float | None
    params_added: int


# ---------------------------------------------------------------------------- resumable stages
# Config fields that change no stage's result: where things are kept, what happens to the inbox
# copy, how often training checkpoints, how the processes are placed, whether activations are
# recomputed (gradient checkpointing: the same losses and gradients). Every other value of the
# sections below does (the base, where and how experts grow, the locator, decoding, what is kept,
# what compaction may remove), base.dtype and base.attn_implementation too: bf16 weights change
# every number, and sdpa, eager and flash attention round differently (within 1e-5 on the tiny
# base), so a stage finished under one is not reused under another.
_NOT_RESULTS = {"data": {"eval_store", "keep_train_cache", "after_decision"},
                "expand": {"checkpoint_every", "log_every", "nproc_per_node", "hostfile", "gradient_checkpointing"}}
_RESULT_SECTIONS = ("base", "moe", "probe", "expand", "locator", "eval", "data", "compact")


def stage_key(bundle_sha256: str, parent_version: int | None, cfg: CmoeConfig) -> str:
    """Identity of one task arrival: the same bundle on the same champion, under a config that gives
    the same results, is the same work (its finished stages are reused); any other config is new work."""
    dump = cfg.model_dump(mode="json", include=set(_RESULT_SECTIONS), exclude=_NOT_RESULTS)
    digest = hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()
    return f"{bundle_sha256[:16]}-v{parent_version or 0}-c{digest[:10]}"


def resumable(out: Path, result_type: type[T], compute: Callable[[Path], T]) -> T:
    """Run `compute(out)` unless an earlier run finished it; its `done.json` is the result either way."""
    done = out / DONE
    if done.is_file():
        data = json.loads(done.read_text())
        wanted = [f.name for f in fields(result_type) if f.init]
        # A result written by an older cmoe lacks the fields added since: compute it again rather
        # than fail on (or guess) what the stage would have said.
        if all(name in data for name in wanted):
            return result_type(**{name: data[name] for name in wanted})
    # Leftovers of an unfinished attempt stay: expansion resumes from its own training checkpoints.
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = compute(out)
    write_text_atomic(done, json.dumps({**asdict(result), WALL_KEY: time.perf_counter() - t0}, indent=2, default=str))
    return result


def stage_wall_s(out: Path) -> float:
    """Seconds the finished stage in `out` took when it was computed (a resumed run reads it back)."""
    return float(json.loads((out / DONE).read_text()).get(WALL_KEY, 0.0))


def _transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry I/O failures (S3 or a network disk hiccup), never a bundle that is simply invalid."""
    try:
        state.result()
    except BundleError:
        return False
    except StorageError:
        return True
    except OSError as err:  # the OS's own I/O errors carry an errno; a library's "corrupt file" OSError does not
        return err.errno is not None
    except Exception:  # noqa: BLE001 - anything else is not transient
        return False
    return False


# ---------------------------------------------------------------------------- stage tasks
@stage_task(name="fetch", retry_condition_fn=_transient)
def fetch(uri: str, cache_dir: Path) -> ValidatedBundle:
    """Validate the bundle once (downloading an S3 one once); every problem is reported, nothing is trained."""
    return open_bundle(uri, cache_dir=cache_dir)


@stage_task(name="keep-eval-set")
def keep(cfg: CmoeConfig, bundle: ValidatedBundle, runs: Path) -> EvalSetRef:
    """Keep the new task's evaluation set (its test split, or `data.eval_keep` rows) in the lineage's store."""
    from cmoe.stages.common import keep_task_eval_set

    return resumable(runs / "eval-set", EvalSetRef, lambda _: keep_task_eval_set(cfg, bundle))


@stage_task(name="make-room")
def make_room(cfg: CmoeConfig, champion: Champion, runs: Path, registry: Registry, run_id: str) -> Champion:
    """The champion to build on: with its full layers compacted first (`run_make_room`) when
    `moe.max_experts_per_layer` is reached, else as it is."""
    from cmoe.stages.compact import CompactResult, full_layers, run_make_room

    if not full_layers(cfg, champion.state_dir):
        return champion
    made = resumable(runs / "make-room", CompactResult, lambda out: run_make_room(cfg, champion.state_dir, out))
    registry.log_stage(run_id, "make-room", made)
    return replace(champion, state_dir=Path(made.state_dir))  # same version, acc: the gate compares with it


@stage_task(name="probe")
def probe(cfg: CmoeConfig, bundle: ValidatedBundle, champion: Champion | None, runs: Path, registry: Registry,
          run_id: str) -> ProbeReport:
    """PGKE: score every CMoE layer with a probe expert and plan where new experts go."""
    from cmoe.stages.probe import ProbeReport, run_probe

    parent_state = champion.state_dir if champion else None
    curve = partial(registry.log_step, registry.stage_run(run_id, "probe"))  # probe_router/* and probe/* by step
    report = resumable(runs / "probe", ProbeReport, lambda out: run_probe(cfg, bundle, parent_state, out, curve))
    registry.log_stage(run_id, "probe", report)
    create_table_artifact(
        key="cmoe-probe",
        table=[{"layer": layer, "share": s.get("share"), "mass": s.get("mass"),
                "grows": _growth(report, layer)}
               for layer, s in sorted(report.scores.items(), key=lambda item: int(item[0]))],
        description=f"PGKE probe of **{report.task}** (tau = {report.tau:.3f}): {_plan_line(report)}",
    )
    return report


@stage_task(name="expand")
def expand(cfg: CmoeConfig, bundle: ValidatedBundle, champion: Champion | None, plan: ProbeReport,
           eval_set: EvalSetRef, runs: Path, registry: Registry, run_id: str) -> ExpandResult:
    """Train the planned experts, the task's router and its locator VAE; older weights stay frozen.

    The training curve (train/loss, train/lr, train/samples_per_s) and the machine's system metrics
    go to the stage's MLflow run as it trains, and the Prefect progress artifact follows the steps.
    """
    from cmoe.stages.expand import ExpandResult, expansion_steps
    from cmoe.stages.launch import expand as run_expand  # in-process, or N ranks (expand.nproc_per_node / hostfile)

    parent_state = champion.state_dir if champion else None
    stage_run = registry.stage_run(run_id, "expand")
    total = expansion_steps(cfg, bundle.counts["train"])
    progress = create_progress_artifact(0.0, key="cmoe-expand-progress",
                                        description=f"Expansion of {bundle.name}: {total} optimizer steps")

    def on_log(step: int, metrics: dict[str, float]) -> None:
        registry.log_step(stage_run, step, metrics, prefix="train/")
        update_progress_artifact(progress, 100 * step / total)

    def train(out: Path) -> ExpandResult:
        with registry.system_metrics(stage_run):
            return run_expand(cfg, bundle, parent_state, plan, out, eval_set=eval_set, on_log=on_log)

    result = resumable(runs / "expand", ExpandResult, train)
    update_progress_artifact(progress, 100.0)
    registry.log_stage(run_id, "expand", result)
    return result


@stage_task(name="evaluate")
def evaluate(cfg: CmoeConfig, step: str, state_dir: str, lineage: list[VersionInfo], runs: Path,
             registry: Registry, run_id: str) -> EvalReport:
    """Re-test every task the candidate holds on the evaluation sets the lineage kept (never an old bundle).

    `lineage`: the versions that learned the candidate's earlier tasks (their accuracy rows);
    `step`: what the candidate did, for the artifact ("after <task>").
    """
    from cmoe.stages.evaluate import EvalReport, run_evaluate

    history = [v.acc for v in lineage]
    report = resumable(runs / "evaluate", EvalReport,
                       lambda out: run_evaluate(cfg, Path(state_dir), out, history))
    registry.log_stage(run_id, "evaluate", report)
    create_markdown_artifact(key="cmoe-accuracy", markdown=accuracy_markdown(report, lineage),
                             description=f"Accuracy matrix {step}")
    return report


@stage_task(name="kpi")
def measure(cfg: CmoeConfig, task: str, params_added: int, report: EvalReport, stages: list[str], trained: dict,
            runs: Path, registry: Registry, run_id: str) -> TaskKpis:
    """The candidate's KPIs (cmoe.stages.kpi) from its evaluation and the wall times of `stages`, whose
    training `trained` (an ExpandResult's or RetireResult's `train`) held world_size devices."""
    from cmoe.stages.kpi import task_kpis

    world = int(trained.get("world_size", 1))
    kpis = task_kpis(cfg.kpi, task, params_added, report, {stage: stage_wall_s(runs / stage) for stage in stages},
                     {"expand": world}, str(trained.get("device", "cpu")), runs / "kpi")
    registry.log_stage(run_id, "kpi", kpis)
    registry.log_summary(run_id, {"kpi": asdict(kpis)})  # its numbers, as kpi.* metrics
    create_table_artifact(key="cmoe-kpi", table=kpi_rows(kpis), description=f"KPIs of the candidate ({task})")
    return kpis


@dataclass
class Candidate:
    """What the gate registers: a new state, its size change and what its version's tags record."""

    task: str  # the task learned (or retired: flows/retire.py)
    state_dir: str
    params_added: int
    bundle_uri: str
    bundle_sha256: str
    tags: dict[str, str]
    learned: bool = True  # False for a retirement: no task of the evaluation is new


@stage_task(name="gate")
def gate(cfg: CmoeConfig, candidate: Candidate, champion: Champion | None, key: str, report: EvalReport,
         summary: dict[str, Any], kpis: TaskKpis, runs: Path, registry: Registry, run_id: str) -> GateResult:
    """Apply the gate policy and register the candidate as a model version (alias `candidate`) whose
    description is its model card."""
    from cmoe.stages.gate import decide

    def register(out: Path) -> GateResult:
        decision = decide(cfg.gate, report, champion.acc if champion else None, candidate.params_added,
                          learned=candidate.learned)
        parent = champion.version if champion else None
        facts = CardFacts(
            task=candidate.task, parent_version=parent, bundle_uri=candidate.bundle_uri,
            bundle_sha256=candidate.bundle_sha256, train_sha256=candidate.tags.get(TRAIN_SHA_TAG),
            eval_set=json.loads(candidate.tags[EVAL_SET_TAG]) if EVAL_SET_TAG in candidate.tags else None,
            tasks=report.tasks, row_labels=[f"after {t}" for t in report.tasks[:-1]] + ["candidate"],
            matrix=report.matrix, metrics=summary, experts=report.experts, kpis=asdict(kpis),
            gate_outcome=decision.outcome, gate_reasons=decision.reasons, gate_metrics=decision.metrics,
            learned=candidate.learned)
        version = registry.register_candidate(
            run_id, Path(candidate.state_dir), key=key, task=candidate.task, bundle_uri=candidate.bundle_uri,
            bundle_sha256=candidate.bundle_sha256, parent_version=parent, acc=report.acc, metrics=summary,
            gate=decision.metrics, kpis=asdict(kpis), card=card(facts),
            tags={"prefect_flow_run_id": str(flow_run.id), **candidate.tags})
        return GateResult(version, decision.outcome, decision.reasons, decision.metrics)

    result = resumable(runs / "gate", GateResult, register)
    registry.log_stage(run_id, "gate", result)
    create_link_artifact(registry.version_url(result.version), link_text=f"{registry.model_name} v{result.version}",
                         key="cmoe-model-version", description="The candidate's model version: its model card")
    return result


def link_run(registry: Registry, run_id: str, what: str) -> None:
    """Link this flow run to its MLflow run (config, training curves, system metrics, dataset input)."""
    create_link_artifact(registry.run_url(run_id), link_text=f"MLflow run of {what}", key="cmoe-mlflow-run",
                         description="The MLflow run of this flow run")


# ---------------------------------------------------------------------------- the flow
# No log_prints: it would capture the stdout that dill (hashing `datasets` map functions) reads back.
@flow(name="continual-task", persist_result=True, result_serializer="json")
def continual_task(bundle_uri: str, config_path: str | None = None) -> TaskOutcome:
    """Learn the task in `bundle_uri` on top of the champion, then approve, reject or ask a reviewer."""
    cfg = load_config(config_path)
    registry = Registry(cfg)
    bundle = fetch.with_options(retries=cfg.flow.fetch_retries, retry_delay_seconds=cfg.flow.retry_delay_s)(
        bundle_uri, cfg.home / "cache")
    # From reading the champion to deciding the candidate, no other run may build on the same champion.
    with lineage_slot(cfg.flow.lineage_limit):
        return learn_task(cfg, registry, bundle)


def learn_task(cfg: CmoeConfig, registry: Registry, bundle: ValidatedBundle) -> TaskOutcome:
    """The body of `continual_task` once the bundle is validated, run while holding the lineage's slot."""
    # The candidate builds on the champion; the pair (bundle, champion) names this arrival's work.
    champion = arrival_champion(registry, bundle)
    parent = champion.version if champion else None
    lineage = registry.lineage(parent) if parent is not None else []
    held = held_versions(lineage)  # the versions that learned the champion's tasks (a retired one's left out)
    if learned := next((v for v in lineage if v.bundle_sha256 == bundle.sha256), None):
        raise ValueError(f"{bundle.uri}: already learned by v{learned.version} ({learned.task}), "
                         f"which the champion v{parent} builds on: nothing to do")
    # A renamed copy of an old task's data is refused here, before anything is recorded or trained
    # (the stages' own guard would refuse it too, but only after the MLflow run had started).
    check_not_learned(bundle, {v.train_sha256: v.task for v in lineage if v.train_sha256})
    key = stage_key(bundle.sha256, parent, cfg)
    runs = cfg.home / "runs" / key
    run_id = registry.start_task_run(key, bundle.name, bundle.sha256, parent, cfg.model_dump(mode="json"),
                                     tags={"prefect_flow_run_id": str(flow_run.id)})
    registry.log_bundle_input(run_id, bundle.name, bundle.uri, bundle.sha256, bundle.counts)
    link_run(registry, run_id, bundle.name)
    try:
        eval_set = keep(cfg, bundle, runs)
        # a full layer (moe.max_experts_per_layer) is compacted first: probe and expansion build on that state
        capped = champion is not None and cfg.moe.max_experts_per_layer is not None
        build_on = make_room(cfg, champion, runs, registry, run_id) if capped else champion
        plan = probe(cfg, bundle, build_on, runs, registry, run_id)
        if cfg.gate.review_plan:
            verdict = review_plan(cfg, registry, run_id, f"## Expansion plan for {plan.task}\n\n{_plan_line(plan)}")
            if verdict.decision == "rejected":
                registry.end_task_run(run_id)
                release(cfg, bundle, registry, run_id=run_id)
                return TaskOutcome(bundle.name, bundle.sha256, parent, None, "plan_rejected", verdict.by,
                                   verdict.reason, {}, None, None, 0)
        expanded = expand(cfg, bundle, build_on, plan, eval_set, runs, registry, run_id)
        report = evaluate(cfg, f"after {bundle.name}", expanded.state_dir, held, runs, registry, run_id)
        summary = headline(report, expanded.params_added)
        registry.log_summary(run_id, {"acc": report.acc, **summary})
        kpis = measure(cfg, bundle.name, report.params_added[-1], report, ["eval-set", "probe", "expand", "evaluate"],
                       expanded.train, runs, registry, run_id)
        candidate = Candidate(bundle.name, expanded.state_dir, expanded.params_added, bundle.uri, bundle.sha256,
                              lineage_tags(bundle, eval_set))
        result = gate(cfg, candidate, champion, key, report, summary, kpis, runs, registry, run_id)
        info = settle(cfg, registry, result.version, result.outcome, result.reasons,
                      review_markdown(result, bundle.name, report, held))
    except Exception:  # not BaseException: a suspended run (Prefect's Pause signal) has not failed
        registry.end_task_run(run_id, failed=True)
        raise
    registry.end_task_run(run_id)
    release(cfg, bundle, registry, version=info.version)  # settle returns once the version is decided
    outcome = TaskOutcome(bundle.name, bundle.sha256, parent, info.version, info.decision, info.decided_by,
                          info.reason, report.acc, report.avg_acc, report.bwt, expanded.params_added)
    create_markdown_artifact(key="cmoe-decision", markdown=decision_markdown(outcome, result, kpis),
                             description=f"Gate decision on {bundle.name}")
    return outcome


def arrival_champion(registry: Registry, bundle: ValidatedBundle) -> Champion | None:
    """The champion this arrival builds on: the current one, or, for this flow run started again after
    it registered its candidate (a suspended review answered), the one it started on, which that
    candidate's approval has replaced."""
    mine = next((v for v in registry.versions() if v.bundle_sha256 == bundle.sha256
                 and v.tags.get("prefect_flow_run_id") == str(flow_run.id)), None)
    if mine is None:
        return registry.champion()
    parent = mine.parent_version
    return None if parent is None else Champion(parent, registry.state_dir(parent), registry.version(parent).acc)


# ---------------------------------------------------------------------------- data lifecycle
def lineage_tags(bundle: ValidatedBundle, eval_set: EvalSetRef) -> dict[str, str]:
    """What a version records of its task's data: the train split's hash and the kept evaluation set."""
    return {TRAIN_SHA_TAG: bundle.split_sha256["train"], EVAL_SET_TAG: json.dumps(asdict(eval_set))}


def release(cfg: CmoeConfig, bundle: ValidatedBundle, registry: Registry, *, version: int | None = None,
            run_id: str | None = None) -> list[str]:
    """Once a task is decided, delete cmoe's local copies of its training data (unless
    `data.keep_train_cache`) and record what went on the version (or the run, for a rejected plan)."""
    if cfg.data.keep_train_cache:
        return []
    removed = forget_local_copies(bundle, cache_dir=cfg.home / "cache")
    if version is not None:
        registry.tag_version(version, {REMOVED_TAG: json.dumps(removed)})
    elif run_id is not None:
        registry.tag_run(run_id, {REMOVED_TAG: json.dumps(removed)})
    return removed


# ---------------------------------------------------------------------------- reports
def _growth(plan: ProbeReport, layer: str) -> str:
    """What `plan` grows in `layer`: "delta", "+N experts" or "-"."""
    n = plan.plan.get(layer, 0)
    return "-" if not n else "delta" if plan.growth == "delta" else f"+{n} expert{'s' * (n > 1)}"


def _plan_line(plan: ProbeReport) -> str:
    layers = ", ".join(f"layer {layer} {_growth(plan, layer)}" for layer in sorted(plan.plan, key=int)
                       if plan.plan[layer]) or "nothing to grow"
    return f"{layers}; {plan.params_to_add:,} params to add, about {plan.est_train_s:.0f} s of training"


def headline(report: EvalReport, params_added: int) -> dict[str, Any]:
    """The metrics a version records and its run logs: Avg (also under MCITlib's name MFN), MFT, BWT,
    forgetting, MAA, locator accuracy, size (formulas: docs/data-lifecycle.md)."""
    return {"avg_acc": report.avg_acc, "mfn": report.avg_acc, "mft": report.mft, "bwt": report.bwt,
            "forgetting": report.forgetting,
            "maa": report.maa, "locator_acc": report.locator_acc, "params_added": params_added}


def accuracy_markdown(report: EvalReport, lineage: list[VersionInfo]) -> str:
    """The accuracy matrix: one row per step of the lineage (the champion's ancestors, then the candidate)."""
    names = [f"v{v.version}" for v in lineage] + ["candidate"]
    table = accuracy_table(["after"], report.tasks, [Row([f"{name} ({task})"], row)
                                                    for name, task, row in zip(names, report.tasks, report.matrix)])
    return (f"{table.markdown()}\n\n**Avg** {cell(report.avg_acc)}, **BWT** {cell(report.bwt)}, "
            f"**forgetting** {cell(report.forgetting)}, **locator accuracy** {cell(report.locator_acc)}")


def review_markdown(result: GateResult, what: str, report: EvalReport, lineage: list[VersionInfo]) -> str:
    """What a reviewer sees in the pause form: the matrix, the gate's reasons and how to answer."""
    reasons = "\n".join(f"- {r}" for r in result.reasons) or "- (none)"
    return (f"## Candidate v{result.version}: {what}\n\n{accuracy_markdown(report, lineage)}\n\n"
            f"Gate ({result.outcome}):\n{reasons}\n\n"
            f"Answer here, or: `cmoe review approve {result.version} --by NAME --reason TEXT` (or `reject`).")


def decision_markdown(outcome: TaskOutcome, result: GateResult, kpis: TaskKpis) -> str:
    """The decision artifact: version, decision, who and why, the gate's metrics and the KPIs."""
    metrics = "\n".join(f"- {k}: {v}" for k, v in result.metrics.items())
    table = "\n".join(["| KPI | value |", "|---|---|"] + [f"| {r['kpi']} | {r['value']} |" for r in kpi_rows(kpis)])
    return (f"## {outcome.task}: v{outcome.version} {outcome.decision}\n\n"
            f"by **{outcome.decided_by}**: {outcome.reason}\n\nGate outcome `{result.outcome}`\n\n{metrics}"
            f"\n\n{table}")


def kpi_rows(kpis: TaskKpis) -> list[dict[str, str]]:
    """The KPIs as (name, formatted value) rows: the `cmoe-kpi` table and the decision artifact's."""
    walls = ", ".join(f"{stage} {s:.1f} s" for stage, s in kpis.wall_s.items())
    return [{"kpi": name, "value": value} for name, value in (
        ("params total", f"{kpis.params_total:,}"), ("params active per token", f"{kpis.params_active:,}"),
        ("params added", f"{kpis.params_added:,}"), ("forward FLOPs per token", f"{kpis.flops_per_token:,}"),
        ("mis-routed rows", f"{cell(kpis.misrouting_pct)} %"),
        ("predict latency p50 / p95", f"{kpis.latency_p50_ms:.1f} / {kpis.latency_p95_ms:.1f} ms"),
        ("predict throughput", f"{kpis.predict_samples_per_s:.1f} rows/s"), ("wall time", walls),
        ("device-hours", f"{kpis.device_hours:.4f} ({kpis.device} × {kpis.world_size} for the expansion)"),
        ("estimated cost", f"{kpis.cost:.2f} {kpis.currency}"))]
