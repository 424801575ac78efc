"""The lineage's record in MLflow, and the only code that talks to MLflow.

One parent run per task arrival holds the config as params and one nested run per stage holds
that stage's metrics and reports. Every candidate becomes a version of the registered model
(default `cmoe`): the full safetensors state directory plus a pyfunc wrapper built from code, so
nothing is ever unpickled, with the cmoe source it runs (cmoe.registry.shipped_code: MLflow's own
`mlflow models serve` restores it). Version tags carry the lineage (task, bundle sha256, parent version)
and the decision (who, why, gate metrics); alias `champion` is the model in use and alias
`candidate` the one awaiting a decision. Works on `sqlite:///` with local artifacts (the default)
and on an MLflow server with S3 artifacts alike.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from cmoe.config import CmoeConfig
from cmoe.model.state import MANIFEST, StateError, read_manifest, verify_state
from cmoe.redact import redact_uri
from cmoe.registry.model_card import with_decision
from cmoe.registry.pyfunc import SIGNATURE, STATE_ARTIFACT, model_config
from cmoe.registry.shipped_code import CODE_SHA256, package_to_ship, pip_requirements
from cmoe.registry.timeouts import limit_requests, no_answer
from cmoe.registry.trusted_code import MODEL_CODE, model_code_problem

Decision = Literal["approved", "rejected", "pending_review"]
PlanReview = Literal["pending", "approved", "rejected"]
CHAMPION, CANDIDATE = "champion", "candidate"
# Version tags of the data lifecycle (docs/data-lifecycle.md): what each version kept and removed.
TRAIN_SHA_TAG = "train_sha256"  # the task's train-split hash (the rehearsal guard's key)
EVAL_SET_TAG = "eval_set"  # JSON of the task's kept evaluation set
REMOVED_TAG = "retention.removed"  # JSON list of the local copies deleted once it was decided
RETIRED_TAG = "retired"  # on a retirement's version: the task it removed (its `task` tag names it too)
COMPACTED_TAG = "compacted"  # on a compaction's version: JSON of what it retired and merged; it learned no task
_NONE = "none"  # tag value of "no parent version"
_MAX_TAG = 4000  # MLflow caps tag values at 5000 characters
# Run params holding a decision, written once: MLflow's database refuses to change a param, so the
# first answer to claim one is the decision (a second claim fails, atomically).
_DECISION_PARAM, _PLAN_PARAM = "cmoe.decision", "cmoe.plan_decision"
# The experiment opens on its training runs, not on MLflow 3's GenAI view (the UI's experiment-type
# selector writes the same tag).
_EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_DIGEST = 36  # MLflow keeps at most 36 characters of a dataset's digest: a sha256's first 36 hex digits
_log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry request that cannot be honoured (unknown version, decision already taken, ...)."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered candidate as recorded in its version tags."""

    version: int
    task: str
    bundle_uri: str  # where the bundle was read from (never read again: later tasks use the kept eval set)
    bundle_sha256: str
    parent_version: int | None
    decision: str  # approved / rejected / pending_review
    decided_by: str
    reason: str
    acc: dict[str, float]  # per-task accuracy (locator routing, percent) of this candidate
    metrics: dict[str, float]  # headline metrics: avg_acc, bwt, locator_acc, params_added, ...
    gate: dict[str, float]  # the gate's metrics
    run_id: str  # the task arrival's parent run
    tags: dict[str, str]
    kpis: dict[str, float] = field(default_factory=dict)  # cmoe.stages.kpi's TaskKpis, numbers only
    card: str = ""  # the version's description: its model card (cmoe.registry.model_card), Markdown

    @property
    def train_sha256(self) -> str | None:
        """Content hash of the task's train split: what the rehearsal guard refuses to learn again."""
        return self.tags.get(TRAIN_SHA_TAG)

    @property
    def eval_set(self) -> dict[str, Any] | None:
        """The task's kept evaluation set (an EvalSetRef as JSON), where the lineage re-tests it."""
        return json.loads(self.tags[EVAL_SET_TAG]) if EVAL_SET_TAG in self.tags else None

    @property
    def removed(self) -> list[str] | None:
        """Local copies of the task's data deleted once it was decided; None while undecided or kept."""
        return json.loads(self.tags[REMOVED_TAG]) if REMOVED_TAG in self.tags else None

    @property
    def retired(self) -> str | None:
        """The task this version removed (`cmoe retire`); None for a version that learned a task."""
        return self.tags.get(RETIRED_TAG)


def held_versions(lineage: list[VersionInfo]) -> list[VersionInfo]:
    """The version that learned each task the lineage's last version still holds, in task order:
    a retirement removes its task's version (and is itself no task's), a compaction is no task's."""
    held: dict[str, VersionInfo] = {}
    for v in lineage:
        if v.retired is not None:
            held.pop(v.retired, None)
        elif COMPACTED_TAG not in v.tags:
            held[v.task] = v
    return list(held.values())


@dataclass(frozen=True)
class Champion:
    """The model in use: its version, a local copy of its state directory, its recorded accuracy."""

    version: int
    state_dir: Path
    acc: dict[str, float]


@dataclass(frozen=True)
class Verdict:
    """One recorded answer: what was decided, by whom, why."""

    decision: str
    by: str
    reason: str


@dataclass(frozen=True)
class PendingPlan:
    """A task arrival whose expansion plan awaits a reviewer (`review_plan: true`)."""

    run_id: str
    task: str
    bundle_sha256: str
    tags: dict[str, str]


def tracking_uri(cfg: CmoeConfig) -> str:
    """The configured tracking URI, or an absolute `sqlite:///<home>/mlflow.db`."""
    return cfg.registry.tracking_uri or f"sqlite:///{(cfg.home / 'mlflow.db').resolve()}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config and reports as MLflow's flat keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _version_tags(mv: Any) -> dict[str, str]:
    return dict(mv.tags or {})


class Registry:
    """MLflow tracking + model registry of one cmoe home (or of the configured server)."""

    def __init__(self, cfg: CmoeConfig) -> None:
        self.model_name = cfg.registry.model_name
        self.tracking_uri = tracking_uri(cfg)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._experiment = cfg.registry.experiment
        self._artifact_location = cfg.registry.artifact_location or (cfg.home / "mlartifacts").resolve().as_uri()
        self._cache = cfg.home / "registry-cache"  # local copies of registered state directories
        self._model_config = model_config(cfg)  # how the pyfunc decodes: recorded at logging, applied at loading
        self._system_metrics_s = cfg.registry.system_metrics_s
        self._ui_url = (cfg.registry.ui_url or (self.tracking_uri if self.tracking_uri.startswith(("http://", "https://"))
                                                else "http://127.0.0.1:5000")).rstrip("/")
        # a server that is down fails each request in bounded time, not after MLflow's minutes of retries
        self._limits = cfg.registry.request_timeout_s, cfg.registry.request_retries
        limit_requests(*self._limits)
        if redact_uri(self.tracking_uri) != self.tracking_uri:
            # MLflow prints every finished run's link on stdout, made from the tracking URI, password
            # and all; cmoe's own links (the flow run's artifacts) show it as ***.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _point_mlflow_here(self) -> None:
        """Aim MLflow's process-wide URIs at this registry: logging models and resolving `models:/`
        URIs use them, whatever URI is passed alongside (else they land in ./mlflow.db)."""
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)

    @cached_property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use with the configured artifact location."""
        try:
            found = self.client.get_experiment_by_name(self._experiment)  # None when there is none yet
        except MlflowException as err:
            raise self._unreadable(f"experiment {self._experiment!r}", err) from None
        if found is not None:
            if _EXPERIMENT_KIND[0] not in found.tags:  # made before cmoe set it; a kind someone chose stays
                self.client.set_experiment_tag(found.experiment_id, *_EXPERIMENT_KIND)
            return found.experiment_id
        try:
            return self.client.create_experiment(self._experiment, artifact_location=self._artifact_location,
                                                 tags=dict([_EXPERIMENT_KIND]))
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(self._experiment).experiment_id

    # ------------------------------------------------------------------ runs
    def start_task_run(self, key: str, task: str, bundle_sha256: str, parent_version: int | None,
                       config: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """The parent run of one task arrival; a re-run of the same arrival (`key`) reuses it."""
        found = self.client.search_runs([self.experiment_id], f"tags.`cmoe.key` = '{key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_tags = {"cmoe.key": key, "task": task, "bundle_sha256": bundle_sha256,
                        "parent_version": str(parent_version or _NONE), **(tags or {})}
            run_id = self.client.create_run(self.experiment_id, tags=run_tags, run_name=task).info.run_id
            self._log_config(run_id, config)
        return run_id

    def _log_config(self, run_id: str, config: dict[str, Any]) -> None:
        """The config as the run's params, any URI's password redacted (e.g. a tracking URI with credentials)."""
        params = [mlflow.entities.Param(k, redact_uri(json.dumps(v) if isinstance(v, list | dict) else str(v)))
                  for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i:i + 100])

    def log_tuning(self, config: dict[str, Any], result: Any) -> str:
        """One run per `cmoe tune` (cmoe.stages.tune's TuneResult; tag `cmoe.tune`): the config as params,
        each point as one step of `point.*` metrics, the chosen one as `chosen.*`, the table as an MLflow
        table, and the report, the table, the Pareto chart and the tuned config as artifacts."""
        data = asdict(result)
        run_id = self.client.create_run(self.experiment_id, run_name="tune",
                                        tags={"cmoe.tune": "true", "tune.reason": data["reason"][:_MAX_TAG]}).info.run_id
        self._log_config(run_id, config)
        points = data["points"]
        for step, point in enumerate(points):
            self.log_step(run_id, step, point, prefix="point.")
        self._log_metrics(run_id, {"chosen": next(p for p in points if p["tau_scale"] == data["chosen"])})
        self.client.log_table(run_id, {k: [p[k] for p in points] for k in points[0]}, "tune_table.json")
        for name in ("report_json", "table_md", "pareto_png", "config_yaml"):
            self.client.log_artifact(run_id, data[name])
        self.client.set_terminated(run_id)
        return run_id

    def stage_run(self, parent_run_id: str, stage: str) -> str:
        """The nested run of one stage of a task arrival (created RUNNING on first use), for its
        training curve while it runs and its results once it is done (`log_stage`)."""
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`cmoe.stage` = '{stage}'", max_results=1)
        if found:
            return found[0].info.run_id
        return self.client.create_run(self.experiment_id, run_name=stage,
                                      tags={"mlflow.parentRunId": parent_run_id, "cmoe.stage": stage}).info.run_id

    def log_step(self, run_id: str, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        """One point of a training curve (`<prefix><name>` at `step`). A failure to record it is logged and
        training goes on: an MLflow hiccup must not cost the expansion it is watching."""
        now = mlflow.utils.time.get_current_time_millis()
        try:
            self.client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"{prefix}{k}", float(v), now, step)
                                                   for k, v in metrics.items() if _number(v)])
        except MlflowException as err:
            _log.warning("training curve point %s not recorded: %s", step, redact_uri(err.message[:300]))

    @contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """Sample CPU, memory, disk, network (and GPU, with pynvml) onto `run_id` as `system/*` metrics
        every `registry.system_metrics_s` while the block runs; nothing when that is None."""
        if self._system_metrics_s is None:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=self._system_metrics_s, resume_logging=True,
                                       tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_bundle_input(self, run_id: str, name: str, uri: str, sha256: str, rows: dict[str, int]) -> None:
        """The bundle as the run's training dataset input (MLflow's Dataset column): digest = its sha256
        (the first 36 digits MLflow keeps; the whole one is in the profile), source = where it was read."""
        if any(i.dataset.digest == sha256[:_DIGEST] for i in self.client.get_run(run_id).inputs.dataset_inputs):
            return  # a re-run of the same arrival
        dataset = Dataset(name=name, digest=sha256[:_DIGEST], source_type="s3" if uri.startswith("s3://") else "local",
                          source=json.dumps({"uri": redact_uri(uri)}),
                          profile=json.dumps({"sha256": sha256, "rows": rows}))
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

    def log_stage(self, parent_run_id: str, stage: str, result: Any) -> str:
        """A nested run for one stage: its numeric results as metrics, its reports and plots as artifacts."""
        data = asdict(result) if is_dataclass(result) else dict(result)
        run_id = self.stage_run(parent_run_id, stage)
        self._log_metrics(run_id, data)
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), f"{stage}.json")
        for name, value in data.items():
            if name.endswith(("_json", "_png")) and value and Path(value).is_file():
                self.client.log_artifact(run_id, str(value))
        self.client.set_terminated(run_id)
        return run_id

    def log_summary(self, run_id: str, metrics: dict[str, Any]) -> None:
        """Headline metrics (per-task accuracy, Avg, BWT, ...) on the task arrival's parent run."""
        self._log_metrics(run_id, metrics)

    def _log_metrics(self, run_id: str, data: dict[str, Any]) -> None:
        metrics = [mlflow.entities.Metric(k, float(v), mlflow.utils.time.get_current_time_millis(), 0)
                   for k, v in flatten(data).items() if _number(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI (`registry.ui_url`)."""
        return f"{redact_uri(self._ui_url)}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def version_url(self, version: int) -> str:
        """The model version's page in the MLflow UI: its model card, tags and aliases."""
        return f"{redact_uri(self._ui_url)}/#/models/{self.model_name}/versions/{version}"

    def end_task_run(self, run_id: str, failed: bool = False) -> None:
        """Close the parent run (FINISHED, or FAILED when the flow failed)."""
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))

    # ------------------------------------------------------------------ plan reviews
    def set_plan_review(self, run_id: str, state: PlanReview, by: str = "", reason: str = "") -> None:
        """Record that a task arrival's expansion plan awaits review, or how it was decided."""
        self.tag_run(run_id, {"plan_review": state, "plan_decided_by": by, "plan_reason": reason[:_MAX_TAG]})

    def decide_plan(self, run_id: str, decision: Literal["approved", "rejected"], by: str, reason: str) -> Verdict:
        """Record the one answer on a task arrival's expansion plan; a later one is refused, naming the first."""
        verdict = Verdict(decision, by, reason[:_MAX_TAG])
        self._claim(run_id, _PLAN_PARAM, verdict, "its expansion plan")
        self.set_plan_review(run_id, decision, by, reason)
        return verdict

    def plan_decision(self, run_id: str) -> Verdict | None:
        """The answer recorded on a task arrival's plan (its tags completed if a crash cut them short), or None."""
        run = self.client.get_run(run_id)
        verdict = _verdict(run.data.params.get(_PLAN_PARAM))
        if verdict is not None and run.data.tags.get("plan_review") != verdict.decision:
            self.set_plan_review(run_id, verdict.decision, verdict.by, verdict.reason)
        return verdict

    def tag_run(self, run_id: str, tags: dict[str, str]) -> None:
        """Add or overwrite tags of a run."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def pending_plans(self) -> list[PendingPlan]:
        """Task arrivals paused on their expansion plan, oldest first."""
        runs = self.client.search_runs([self.experiment_id], "tags.plan_review = 'pending'",
                                       order_by=["attributes.start_time ASC"])
        return [PendingPlan(r.info.run_id, r.data.tags.get("task", ""), r.data.tags.get("bundle_sha256", ""),
                            dict(r.data.tags)) for r in runs]

    # ------------------------------------------------------------------ versions
    def register_candidate(self, run_id: str, state_dir: Path, *, key: str, task: str, bundle_uri: str,
                           bundle_sha256: str, parent_version: int | None, acc: dict[str, float],
                           metrics: dict[str, Any], gate: dict[str, Any], tags: dict[str, str] | None = None,
                           kpis: dict[str, Any] | None = None, card: str = "") -> int:
        """Log `state_dir` + the pyfunc wrapper as a new version pending a decision; alias `candidate`.
        `card` (cmoe.registry.model_card) is the version's description; `kpis` go in `kpi.*` tags.

        Idempotent per task arrival (`key`): a re-run returns the version registered before, finishing
        its registration if the run that registered it was killed before giving it its card and alias.
        """
        found = self.client.search_model_versions(f"name = '{self.model_name}' and tags.`cmoe.key` = '{key}'")
        if found:
            mv = found[0]
            if _version_tags(mv).get("decision") == "pending_review":  # maybe registered by a run killed since
                self._finish_registration(int(mv.version), mv.description, card)
            return int(mv.version)
        self._point_mlflow_here()
        # No input example: MLflow would load the model and predict with it just to check the example.
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings(), package_to_ship() as (code, code_sha256):
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), artifacts={STATE_ARTIFACT: str(state_dir)},
                signature=SIGNATURE, model_config=self._model_config,
                # The cmoe source travels with the model (no index has cmoe), with the sha256 of each
                # file; the listed requirements are what it imports (listing them skips MLflow's ~20 s
                # inference): cmoe.registry.shipped_code.
                code_paths=[str(code)], metadata={CODE_SHA256: code_sha256}, pip_requirements=pip_requirements())
        version_tags = {
            "cmoe.key": key, "task": task, "bundle_uri": bundle_uri, "bundle_sha256": bundle_sha256,
            "parent_version": str(parent_version or _NONE), "decision": "pending_review", "decided_by": "",
            "reason": "", "acc": json.dumps(acc),
            **{f"metric.{k}": str(v) for k, v in flatten(metrics).items() if _number(v)},
            **{f"gate.{k}": str(v) for k, v in flatten(gate).items()},
            **{f"kpi.{k}": str(v) for k, v in flatten(kpis or {}).items() if _number(v)}, **(tags or {}),
        }
        # The version and its tags are one database write: a version found by its key has all its tags.
        mv = mlflow.register_model(info.model_uri, self.model_name, tags=version_tags)
        version = int(mv.version)  # str over REST, int over sqlite
        self._finish_registration(version, None, card)
        return version

    def _finish_registration(self, version: int, description: str | None, card: str) -> None:
        """The steps after registering a version: its model card (unless it has one) and the `candidate`
        alias; done again for a pending version found registered, in case a killed run left them out."""
        if not description:
            self.client.update_model_version(self.model_name, str(version), description=card)
        self.client.set_registered_model_alias(self.model_name, CANDIDATE, str(version))  # may be set already

    def tag_version(self, version: int, tags: dict[str, str]) -> None:
        """Add or overwrite tags of a version (e.g. the flow run now waiting for its review)."""
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), key, value)

    def version(self, version: int) -> VersionInfo:
        """Tags of one version, parsed; RegistryError when it does not exist."""
        try:
            mv = self.client.get_model_version(self.model_name, str(version))
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"model {self.model_name!r} has no version {version}") from None
            raise self._unreadable(f"version {version}", err) from None
        return self._info(mv)

    def versions(self) -> list[VersionInfo]:
        """Every version of the registered model, oldest first (none before the first registration).

        A registry that cannot be read is a RegistryError, never "no versions": callers decide
        what to train on and what to promote from this.
        """
        try:
            found = self.client.search_model_versions(f"name = '{self.model_name}'")
        except MlflowException as err:
            raise self._unreadable("versions", err) from None
        return sorted((self._info(mv) for mv in found), key=lambda v: v.version)

    def aliases(self) -> dict[str, int]:
        """{alias: version} of the registered model (empty before the first registration only:
        an unreadable registry is a RegistryError, never "no champion")."""
        try:
            model = self.client.get_registered_model(self.model_name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise self._unreadable("aliases", err) from None
        return {alias: int(v) for alias, v in (model.aliases or {}).items()}

    def _unreadable(self, what: str, err: MlflowException) -> RegistryError:
        message = str(err.message)
        why = no_answer(message, *self._limits) or redact_uri((message.splitlines() or [""])[0][:300])
        where = redact_uri(self.tracking_uri)
        return RegistryError(f"cannot read model {self.model_name!r} ({what}) from {where}: {why}")

    @staticmethod
    def _info(mv: Any) -> VersionInfo:
        tags = _version_tags(mv)
        parent = tags.get("parent_version", _NONE)
        return VersionInfo(
            version=int(mv.version), task=tags.get("task", ""), bundle_uri=tags.get("bundle_uri", ""),
            bundle_sha256=tags.get("bundle_sha256", ""),
            parent_version=None if parent == _NONE else int(parent), decision=tags.get("decision", ""),
            decided_by=tags.get("decided_by", ""), reason=tags.get("reason", ""),
            acc=json.loads(tags.get("acc", "{}")),
            metrics=_numbers(tags, "metric."), gate=_numbers(tags, "gate."),
            run_id=mv.run_id or "", tags=tags, kpis=_numbers(tags, "kpi."), card=mv.description or "",
        )

    def pending_reviews(self) -> list[VersionInfo]:
        """Versions waiting for a reviewer's decision, oldest first."""
        return [v for v in self.versions() if v.decision == "pending_review"]

    def processed_bundle_hashes(self) -> set[str]:
        """Bundles already handled: registered as a version (any decision), or their plan rejected."""
        rejected = self.client.search_runs([self.experiment_id], "tags.plan_review = 'rejected'")
        return {v.bundle_sha256 for v in self.versions()} | {r.data.tags["bundle_sha256"] for r in rejected}

    def lineage(self, version: int) -> list[VersionInfo]:
        """The versions `version` builds on, root first, ending with `version` itself."""
        chain = [self.version(version)]
        while chain[-1].parent_version is not None:
            chain.append(self.version(chain[-1].parent_version))
        return chain[::-1]

    def check_decision(self, version: int, decision: Decision) -> VersionInfo:
        """The version, if `decision` may be taken on it now; RegistryError saying why not (and who decided) otherwise."""
        info = self.version(version)
        first = (Verdict(info.decision, info.decided_by, info.reason) if info.decision != "pending_review"
                 else self._claimed(info.run_id, _DECISION_PARAM))
        if first is not None:
            raise _already(f"version {version}", first)
        champion = self.aliases().get(CHAMPION)
        if decision == "approved" and info.parent_version != champion:
            # Approving it would silently drop what the current champion learned after its parent.
            raise RegistryError(f"version {version} builds on version {info.parent_version}, but the champion "
                                f"is now {champion}: reject it and re-run its bundle")
        if decision == "approved":
            self.verify_loadable(version)  # the champion must load: never promote an incomplete state
        return info

    def decide_version(self, version: int, decision: Decision, by: str, reason: str) -> VersionInfo:
        """Record the one decision on a pending version; `approved` moves `champion` to it, `rejected` does not.

        The first answer claims the decision atomically; every later one (the same answer again too)
        is refused with a RegistryError naming who decided what.
        """
        info = self.check_decision(version, decision)
        verdict = Verdict(decision, by, reason[:_MAX_TAG])
        self._claim(info.run_id, _DECISION_PARAM, verdict, f"version {version}")
        return self._record(info, verdict)

    def recorded_decision(self, version: int) -> VersionInfo | None:
        """The version once a decision on it is recorded (finishing one a crash cut short); None while pending."""
        info = self.version(version)
        if info.decision != "pending_review":
            return info
        verdict = self._claimed(info.run_id, _DECISION_PARAM)
        return None if verdict is None else self._record(info, verdict)

    def _record(self, info: VersionInfo, verdict: Verdict) -> VersionInfo:
        """Write a claimed decision into tags and aliases; the `decision` tag last, so a version that
        reads as decided is completely so (until then `recorded_decision` can finish it)."""
        version, tags = str(info.version), {"decided_by": verdict.by, "reason": verdict.reason}
        for key, value in tags.items():
            _rewrite(self.client.set_model_version_tag, self.model_name, version, key, value)
        for key, value in {**tags, "decision": verdict.decision}.items():
            _rewrite(self.client.set_tag, info.run_id, key, value)
        if verdict.decision == "approved":
            _rewrite(self.client.set_registered_model_alias, self.model_name, CHAMPION, version)
        if self.aliases().get(CANDIDATE) == info.version:
            self.client.delete_registered_model_alias(self.model_name, CANDIDATE)  # a no-op when already gone
        card = self.client.get_model_version(self.model_name, version).description or ""
        _rewrite(self.client.update_model_version, self.model_name, version,
                 with_decision(card, verdict.decision, verdict.by, verdict.reason))
        _rewrite(self.client.set_model_version_tag, self.model_name, version, "decision", verdict.decision)
        return self.version(info.version)

    def _claim(self, run_id: str, key: str, verdict: Verdict, what: str) -> None:
        """Write `verdict` as the run's write-once param `key`; RegistryError naming the answer that was first."""
        value = json.dumps({**asdict(verdict), "claim": uuid4().hex})  # unique: a repeated answer is a second one
        try:
            self.client.log_param(run_id, key, value)
        except MlflowException as err:
            if (first := self._claimed(run_id, key)) is None:
                raise RegistryError(f"{what}: the decision could not be recorded ({err.message})") from None
            raise _already(what, first) from None

    def _claimed(self, run_id: str, key: str) -> Verdict | None:
        """The answer claimed under the run's param `key`, if any."""
        return _verdict(self.client.get_run(run_id).data.params.get(key))

    def rollback(self, version: int) -> int | None:
        """Move `champion` back to an earlier approved version; returns the version it left."""
        info = self.version(version)
        if info.decision != "approved":
            raise RegistryError(f"version {version} was never approved ({info.decision}): it cannot be champion")
        previous = self.aliases().get(CHAMPION)
        self.client.set_registered_model_alias(self.model_name, CHAMPION, str(version))
        return previous

    def predict(self, model_uri: str, images: list[Any], questions: list[str]) -> list[dict[str, Any]]:
        """Answers of a registered model (e.g. `models:/cmoe@champion`) through its pyfunc, decoded per this
        config; downloaded first, and loaded only if the code it would run is this installation's."""
        import pandas as pd

        self._point_mlflow_here()
        with tempfile.TemporaryDirectory(prefix="cmoe-predict-") as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
                if problem := model_code_problem(local):
                    raise RegistryError(f"refusing to load {model_uri}: {problem}")
                model = mlflow.pyfunc.load_model(str(local), model_config=self._model_config)
            except MlflowException as err:  # e.g. no champion yet
                raise RegistryError(f"cannot load {model_uri} from {redact_uri(self.tracking_uri)}: "
                                    f"{redact_uri(err.message)}") from None
            try:
                return model.predict(pd.DataFrame({"image": images, "question": questions})).to_dict("records")
            except MlflowException as err:  # rows the pyfunc refuses (cmoe.registry.pyfunc)
                raise RegistryError(f"{model_uri} cannot answer: {err.message}") from None

    def champion(self) -> Champion | None:
        """The champion's version, a local copy of its state directory and its accuracy; None before any."""
        version = self.aliases().get(CHAMPION)
        if version is None:
            return None
        return Champion(version, self.state_dir(version), self.version(version).acc)

    def state_dir(self, version: int) -> Path:
        """A local copy of a version's CMoE state directory (downloaded once per version)."""
        model_dir = self._cache / f"v{version}"
        if not (model_dir / "MLmodel").is_file():
            self._cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.", dir=self._cache))
            self._point_mlflow_here()
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{self.model_name}/{version}",
                                                    dst_path=str(tmp))
                shutil.rmtree(model_dir, ignore_errors=True)
                tmp.rename(model_dir)  # atomic: a half-downloaded copy is never used
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        artifacts = Model.load(str(model_dir)).flavors["python_function"]["artifacts"]
        state = (model_dir / artifacts[STATE_ARTIFACT]["path"]).resolve()
        if not state.is_relative_to(model_dir.resolve()):  # a crafted MLmodel must not point elsewhere
            raise RegistryError(f"version {version}: its MLmodel names a state outside the model ({state})")
        return state

    def manifest(self, version: int) -> dict:
        """A version's state manifest (cmoe.model.state), without its weights: read from the local copy
        when one is cached, else only the MLmodel file and the manifest are downloaded."""
        if (self._cache / f"v{version}" / "MLmodel").is_file():
            return read_manifest(self.state_dir(version))
        self._point_mlflow_here()
        uri = f"models:/{self.model_name}/{version}"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=f"{tmp}/m")
                state = Model.load(mlmodel).flavors["python_function"]["artifacts"][STATE_ARTIFACT]["path"]
                if Path(state).is_absolute() or ".." in Path(state).parts:  # a crafted MLmodel must not point elsewhere
                    raise RegistryError(f"version {version}: its MLmodel names a state outside the model ({state})")
                file = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{state}/{MANIFEST}", dst_path=f"{tmp}/s")
                return read_manifest(Path(file).parent)
        except (MlflowException, KeyError, StateError) as err:
            raise RegistryError(f"version {version}: no readable state manifest ({redact_uri(str(err))[:300]})") from None

    def verify_loadable(self, version: int) -> Path:
        """The version's state, downloaded from the artifact store and checked as a load checks it
        (manifest, base hash, every delta's hash and tensors); RegistryError if it cannot be champion."""
        try:
            state = self.state_dir(version)
            verify_state(state)
        except (StateError, MlflowException, OSError, KeyError) as err:
            raise RegistryError(f"version {version} cannot become champion: its state does not verify "
                                f"({redact_uri(str(err))})") from None
        return state


def _verdict(param: str | None) -> Verdict | None:
    """A claimed answer read back from its run param."""
    if param is None:
        return None
    data = json.loads(param)
    return Verdict(data["decision"], data["by"], data["reason"])


def _rewrite(write: Callable[..., Any], *args: str) -> None:
    """Write what another process may be writing at the same moment (both finishing one claimed
    decision, with the same values): MLflow's insert-or-update can then clash on the row the other
    inserted, and a second try updates it."""
    try:
        write(*args)
    except MlflowException:
        write(*args)


def _already(what: str, first: Verdict) -> RegistryError:
    """The refusal of an answer that came second: who decided what, and why."""
    return RegistryError(f"{what} is already {first.decision} (by {first.by}: {first.reason})")


def _numbers(tags: dict[str, str], prefix: str) -> dict[str, float]:
    """{name: value} of the numeric tags named `<prefix><name>`."""
    found = {}
    for key, value in tags.items():
        if key.startswith(prefix):
            try:
                found[key.removeprefix(prefix)] = float(value)
            except ValueError:
                continue  # a non-numeric gate detail stays readable in `tags`
    return found
