"""The real flows on a tiny two-task suite: watcher (S3 inbox), reviews, resume after a failure."""

from __future__ import annotations

import contextvars
import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from typer.testing import CliRunner

from cmoe.config import load_config
from cmoe.registry import Registry

from .conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """Run a flow in a thread (with this context's Prefect settings) while the test acts as reviewer."""
    return ThreadPoolExecutor(max_workers=1).submit(contextvars.copy_context().run, fn, *args)


def flow_runs(flow_name: str) -> list[Any]:
    """Every run of one flow recorded by the session's Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, calls: dict[str, int]) -> None:
    """Count the calls of a stage function (the flow imports stages lazily, so the patch is seen)."""
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_watcher_runs_each_new_s3_bundle_once(watched: tuple[str, list[Any], list[Any]], suite: list[Path]) -> None:
    """Two watcher runs over an S3 inbox start one `continual-task` per bundle, in arrival order."""
    config, first, second = watched
    names = [b.name.split("-", 1)[1] for b in suite]
    assert [o.task for o in first] == names and second == []
    started = [r for r in flow_runs("continual-task") if r.parameters["bundle_uri"].startswith("s3://inbox/new/")]
    assert len(started) == 2

    registry = Registry(load_config(config))
    assert [(v.task, v.decision, v.decided_by) for v in registry.versions()] == [
        (names[0], "approved", "gate"), (names[1], "approved", "gate")]
    assert registry.champion().version == 2 and [v.version for v in registry.lineage(2)] == [1, 2]
    assert set(registry.version(2).acc) == set(names) and "bwt" in registry.version(2).metrics


def test_a_copy_under_another_name_is_known_by_its_content_and_not_learned_again(
        watched: tuple[str, list[Any], list[Any]], suite: list[Path], tmp_path: Path) -> None:
    """Both learned bundles delivered again, copied under new names into another inbox: no run starts."""
    from flows.watch import watch_inbox

    config = watched[0]
    inbox = tmp_path / "inbox"
    for bundle in suite:
        shutil.copytree(bundle, inbox / f"again-{bundle.name}")
    runs, versions = len(flow_runs("continual-task")), Registry(load_config(config)).versions()
    assert watch_inbox(config, str(inbox)) == []
    assert len(flow_runs("continual-task")) == runs and Registry(load_config(config)).versions() == versions


def test_copies_arriving_together_are_one_arrival_run_as_the_oldest() -> None:
    from cmoe.data.storage import BundleRef
    from flows.watch import by_content

    def ref(name: str, minute: int) -> BundleRef:
        return BundleRef(f"/inbox/{name}", name, datetime(2026, 1, 1, 0, minute, tzinfo=UTC))

    new = {ref("color", 0): "sha-a", ref("shape", 1): "sha-b", ref("color-copy", 2): "sha-a"}  # oldest first
    assert by_content(new) == {"sha-a": [ref("color", 0), ref("color-copy", 2)], "sha-b": [ref("shape", 1)]}


def test_predict_answers_with_the_champion(watched: tuple[str, list[Any], list[Any]], suite: list[Path],
                                           cli: Callable[..., str]) -> None:
    """`cmoe predict` loads models:/cmoe@champion (the pyfunc) and answers with the located task."""
    import cmoe.stages.predict  # noqa: F401 - what the pyfunc runs: an import error fails here, plainly
    image = next((suite[0] / "test").rglob("*.png"))
    out = cli("predict", "--image", str(image), "--question", "what color is the shape?", "--config", watched[0])
    assert "task" in out and "confidence" in out and "margin" in out


def artifacts_of(flow_run_id: UUID) -> dict[str, Any]:
    """{key: latest artifact} a flow run (or its tasks) published."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in sorted(found, key=lambda a: a.created)}


def test_a_registered_version_carries_its_model_card_and_its_bundle_as_dataset_input(
        watched: tuple[str, list[Any], list[Any]], cli: Callable[..., str]) -> None:
    """The version page's description is the model card; the task's run lists the bundle, digest = its sha256."""
    registry = Registry(load_config(watched[0]))
    v2 = registry.version(2)
    for section in ("## Data", "## Accuracy", "## Experts per layer", "## Size, cost and routing", "## Gate: approve",
                    "## Hardware", "## Decision\n\n**approved** by **gate**"):
        assert section in v2.card, section
    assert v2.bundle_sha256 in v2.card and v2.task in v2.card
    assert "Experts per layer" in cli("review", "show", "2", "--card", "--config", watched[0])

    (given,) = registry.client.get_run(v2.run_id).inputs.dataset_inputs
    assert given.dataset.digest == v2.bundle_sha256[:36]  # MLflow keeps 36 characters of a digest
    assert json.loads(given.dataset.profile)["sha256"] == v2.bundle_sha256
    assert json.loads(given.dataset.source) == {"uri": v2.bundle_uri}
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]


def test_probe_and_expansion_log_their_training_curves_step_by_step(watched: tuple[str, list[Any], list[Any]]) -> None:
    """Every step (tiny config: log_every 1) of both probe phases and of the expansion is a metric point."""
    cfg = load_config(watched[0])
    registry = Registry(cfg)
    run = registry.version(2).run_id
    expand_run, probe_run = registry.stage_run(run, "expand"), registry.stage_run(run, "probe")
    steps = registry.client.get_run(expand_run).data.metrics["train.steps"]
    for name in ("train/loss", "train/lr", "train/samples_per_s"):
        assert [m.step for m in registry.client.get_metric_history(expand_run, name)] == list(range(1, int(steps) + 1))
    for name, n in (("probe_router/loss", cfg.probe.router_steps), ("probe/loss", cfg.probe.steps)):
        assert [m.step for m in registry.client.get_metric_history(probe_run, name)] == list(range(1, n + 1))


def test_kpis_are_recorded_and_agree_with_what_they_summarise(watched: tuple[str, list[Any], list[Any]],
                                                               cli: Callable[..., str]) -> None:
    """Sizes add up across versions, cost = device-hours × rate, and the KPIs reach MLflow, Prefect and the CLI."""
    cfg = load_config(watched[0])
    registry = Registry(cfg)
    v1, v2 = registry.version(1).kpis, registry.version(2).kpis
    assert v2["params_total"] - v1["params_total"] == v2["params_added"] > 0  # what task 2 added, measured twice
    assert v2["params_active"] < v2["params_total"] and v2["flops_per_token"] > 2 * v2["params_active"]
    assert v2["misrouting_pct"] == pytest.approx(100 - registry.version(2).metrics["locator_acc"])
    assert 0 < v2["latency_p50_ms"] <= v2["latency_p95_ms"] and v2["predict_samples_per_s"] > 0
    walls = [v2[f"wall_s.{stage}"] for stage in ("eval-set", "probe", "expand", "evaluate")]
    assert all(w > 0 for w in walls) and v2["device_hours"] == pytest.approx(sum(walls) / 3600)  # one device
    assert v2["cost"] == pytest.approx(v2["device_hours"] * cfg.kpi.cost_per_device_hour)
    assert registry.client.get_run(registry.version(2).run_id).data.metrics["kpi.params_added"] == v2["params_added"]
    assert "params_added" in cli("review", "show", "2", "--config", watched[0]).split("kpis:")[1]

    artifacts = artifacts_of(UUID(registry.version(2).tags["prefect_flow_run_id"]))  # the run that registered it
    assert f"| params added | {int(v2['params_added']):,} |" in artifacts["cmoe-decision"].data
    assert artifacts["cmoe-expand-progress"].data == 100.0
    assert f"/runs/{registry.version(2).run_id})" in artifacts["cmoe-mlflow-run"].data
    assert "/#/models/cmoe/versions/2)" in artifacts["cmoe-model-version"].data


def test_review_approve_reject_and_resume(suite: list[Path], write_config: Callable[..., str],
                                          cli: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan + version approved through `cmoe review`; a rejected plan trains nothing; a failed evaluation
    resumes there; the automatic gate rejects what its thresholds refuse, and the champion stays."""
    import cmoe.stages.evaluate as evaluate
    import cmoe.stages.expand as expand
    import cmoe.stages.probe as probe
    from flows.continual import continual_task

    with_plan = write_config("plan", require_review=True, review_plan=True)
    review = write_config("review", require_review=True)
    # The session's tiny base scores 0 % on a new task (tests/stages/conftest.py): this gate rejects it.
    strict = write_config("strict", min_new_task_acc=50.0)
    registry = Registry(load_config(review))

    # Task 1: the run pauses on its expansion plan, then on the candidate; both approved from the CLI.
    run = in_background(continual_task, str(suite[0]), with_plan)
    plan = wait_for(registry.pending_plans, what="plan review")[0]
    name = plan.tags["prefect_flow_run_name"]
    assert name in cli("review", "list", "--config", review)
    cli("review", "approve", name, "--by", "ann", "--reason", "plan is small", "--config", review)
    wait_for(registry.pending_reviews, what="candidate review")
    assert "approved" in cli("review", "approve", "1", "--by", "ann", "--reason", "no forgetting", "--config", review)
    outcome = run.result(timeout=300)
    assert (outcome.version, outcome.decision, outcome.decided_by) == (1, "approved", "ann")
    assert registry.champion().version == 1

    # Task 2: its expansion plan is rejected from the CLI: nothing is trained, nothing is registered.
    calls = {"run_probe": 0, "run_expand": 0}
    count_calls(monkeypatch, probe, "run_probe", calls)
    count_calls(monkeypatch, expand, "run_expand", calls)
    run = in_background(continual_task, str(suite[1]), with_plan)
    name = wait_for(registry.pending_plans, what="plan review")[0].tags["prefect_flow_run_name"]
    cli("review", "reject", name, "--by", "bob", "--reason", "too many experts", "--config", review)
    outcome = run.result(timeout=300)
    assert (outcome.version, outcome.decision, outcome.decided_by) == (None, "plan_rejected", "bob")
    assert calls == {"run_probe": 1, "run_expand": 0}
    assert [v.version for v in registry.versions()] == [1] and registry.champion().version == 1

    # Task 2 again, without a plan review: evaluation fails once; the re-run resumes at evaluation
    # (the probe is the rejected plan's, the expansion is not redone).
    real_evaluate = evaluate.run_evaluate

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(evaluate, "run_evaluate", real_evaluate)
        raise RuntimeError("injected evaluation failure")

    monkeypatch.setattr(evaluate, "run_evaluate", fail_once)
    with pytest.raises(RuntimeError, match="injected"):
        continual_task(str(suite[1]), review)
    # The gate is not part of the stages' key: the re-run under the strict gate resumes the same work.
    outcome = continual_task(str(suite[1]), strict)
    assert calls == {"run_probe": 1, "run_expand": 1}

    # Rejected by the automatic gate: the champion stays, the decision is recorded on the version.
    assert (outcome.version, outcome.decision, outcome.decided_by) == (2, "rejected", "gate")
    assert registry.champion().version == 1
    v2 = registry.version(2)
    assert (v2.decision, v2.decided_by, v2.parent_version) == ("rejected", "gate", 1)
    assert v2.reason.startswith("new task") and "< 50.0" in v2.reason
    assert "already rejected (by gate: new task" in refusal("review", "approve", "2", "--by", "bob", "--reason", "late",
                                                            "--config", review)
    assert "nothing waits" in cli("review", "list", "--config", review)
    assert "rejected by gate" in cli("review", "show", "2", "--config", review)


def with_flow(config: str, **flow: Any) -> str:
    """The config file with some `flow:` settings changed."""
    data = yaml.safe_load(Path(config).read_text())
    data["flow"].update(flow)
    Path(config).write_text(yaml.safe_dump(data))
    return config


def refusal(*args: str) -> str:
    """Output of a `cmoe` command that must fail."""
    from cmoe.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code != 0, f"cmoe {' '.join(args)} was not refused:\n{result.output}"
    return result.output


def resumed_from_the_ui(flow_run_id: str, answer: dict[str, str]) -> bool:
    """What the Prefect UI's Resume button does with the filled form; False until the run is parked with it."""
    from prefect import get_client
    from prefect.client.schemas.responses import SetStateStatus

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
        return bool(state and state.is_paused()
                    and client.resume_flow_run(UUID(flow_run_id), run_input=answer).status == SetStateStatus.ACCEPT)


def test_the_first_answer_decides_whenever_it_comes(suite: list[Path], write_config: Callable[..., str],
                                                    cli: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer given before the run waits (the CLI race), one from the UI form; later answers are refused."""
    from flows.continual import continual_task

    # An unanswered review fails the run after 120 s instead of 7 days: a run waiting for nothing fails the test.
    config = with_flow(write_config("race", require_review=True), review_timeout_s=120)
    registry = Registry(load_config(config))

    # Task 1: the reviewer answers once the version awaits review but before the run has parked on it.
    real_tag_version = Registry.tag_version
    early: list[str] = []

    def answer_before_parking(self: Registry, version: int, tags: dict[str, str]) -> None:
        real_tag_version(self, version, tags)
        if "prefect_flow_run_id" in tags and not early:  # settle, about to park the run
            early.append(cli("review", "approve", str(version), "--by", "ann", "--reason", "early", "--config", config))

    monkeypatch.setattr(Registry, "tag_version", answer_before_parking)
    outcome = continual_task(str(suite[0]), config)
    monkeypatch.undo()
    assert "version 1: approved by ann" in early[0]
    assert (outcome.version, outcome.decision, outcome.decided_by) == (1, "approved", "ann")
    assert registry.champion().version == 1
    assert "already approved (by ann: early)" in refusal("review", "reject", "1", "--by", "bob", "--reason", "late",
                                                         "--config", config)

    # Task 2: answered in the Prefect UI form of the parked run; the CLI comes second and is refused.
    run = in_background(continual_task, str(suite[1]), config)
    flow_run_id = wait_for(registry.pending_reviews, what="candidate review")[0].tags["prefect_flow_run_id"]
    ui_answer = {"decision": "reject", "by": "cy", "reason": "seen in the UI"}
    wait_for(lambda: resumed_from_the_ui(flow_run_id, ui_answer), what="run parked with its review form")
    outcome = run.result(timeout=300)
    assert (outcome.version, outcome.decision, outcome.decided_by, outcome.reason) == (2, "rejected", "cy",
                                                                                       "seen in the UI")
    assert registry.champion().version == 1
    assert "already rejected (by cy: seen in the UI)" in refusal(
        "review", "approve", "2", "--by", "ann", "--reason", "late", "--config", config)
