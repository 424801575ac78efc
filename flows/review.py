"""Reviews: a candidate (or an expansion plan) waits for a person, and exactly one answer decides it.

A `continual-task` run asks a person when the gate says so (or `gate.require_review: true`) and,
with `gate.review_plan: true`, once more after the probe, before anything is trained. An answer
can come from the run's `ReviewInput` form in the Prefect UI or from `cmoe review approve|reject`
in a shell, and it can come at any moment: before the run waits, while it waits, after it gave
up or was killed. Three rules make every order of events end in one decision and no run waiting
for an answer that already came.

## 1. The registry records a decision, once

`Registry.decide_version` (and `Registry.decide_plan` for plans) is the only code that records a
decision. It first *claims* it with a write-once MLflow run param (MLflow's database refuses to
change a param, atomically), so whichever answer claims first is the decision and every later
answer is refused with a `RegistryError` naming who decided what. The gate's own approve or
reject goes through the same door: a reviewer who answered first wins over it.

## 2. The CLI records, then wakes the run

`submit_review` (behind `cmoe review approve|reject`) records the answer through the registry
whether or not a run waits for it yet, then resumes the run if it is parked so that it carries
on at once. Waking is a courtesy for a paused run, which finds the decision by itself; a
suspended run needs it to be started again.

## 3. The run parks, then watches the registry and its own state

`settle` and `review_plan` first look in the registry: a run started again, or one answered while
it was still training, does not wait at all. Otherwise `wait_for_answer`

1. parks the run: a Paused state carrying the `ReviewInput` form (Suspended instead for deployed
   runs with `flow.suspend_reviews`, which frees the worker), and *then*,
2. every `flow.review_poll_s`, looks in the registry: a decision recorded there ends the wait and
   the run leaves its pause;
3. and at its own state: resumed from the UI, it records the form's answer through the registry
   (rule 1); if another answer came first, that one stands and the refusal goes to the run's log.

A suspended run looks in the registry once, right after parking, and then exits. Started again
(the same flow run), it builds on the champion it started from (`arrival_champion` in
flows/continual.py), though an approval has moved `champion` onto its own candidate, so every
stage resumes from its `done.json` and `settle` finds the decision.

## Why this cannot deadlock

The run parks before its first look, and the CLI records before it wakes. In any interleaving,
then, either the CLI's record comes before one of the run's looks, which sees it, or the run was
already parked (form saved) when the CLI woke it, and the wake succeeds; a suspended run woken
this way starts again and its `settle` finds the decision before it would park. A UI answer
resumes the run itself. A run that times out (`flow.review_timeout_s`) or is killed while it
waits leaves its version pending: the CLI records the answer without it, and the next run of the
same bundle reads it from the registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Literal, TypeVar
from uuid import UUID

import httpx
from prefect import get_client, get_run_logger
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound, Pause
from prefect.input import RunInput, keyset_from_paused_state
from prefect.runtime import deployment, flow_run
from prefect.states import Paused, Running, Suspended

from cmoe.config import CmoeConfig
from cmoe.registry import Registry, RegistryError, Verdict, VersionInfo

T = TypeVar("T")
Answer = Literal["approve", "reject"]
DECIDED: dict[str, Literal["approved", "rejected"]] = {"approve": "approved", "reject": "rejected"}


class ReviewInput(RunInput):
    """A reviewer's answer to a parked run: the form the Prefect UI shows, and what the CLI sends."""

    decision: Answer
    by: str
    reason: str


# ---------------------------------------------------------------------------- the run's side
def settle(cfg: CmoeConfig, registry: Registry, version: int, outcome: Literal["approve", "reject", "review"],
           reasons: list[str], review: str) -> VersionInfo:
    """The version's one decision: recorded earlier (a re-run, an early answer), the gate's, or a reviewer's."""
    recorded = partial(registry.recorded_decision, version)
    if (info := recorded()) is not None:
        return info
    if outcome != "review":
        return _first(partial(registry.decide_version, version, DECIDED[outcome], "gate", "; ".join(reasons)), recorded)
    registry.tag_version(version, {"prefect_flow_run_id": str(flow_run.id)})  # the run `cmoe review` wakes
    return wait_for_answer(cfg, "review", review, recorded,
                           lambda a: registry.decide_version(version, DECIDED[a.decision], a.by, a.reason))


def review_plan(cfg: CmoeConfig, registry: Registry, run_id: str, plan: str) -> Verdict:
    """The expansion plan's one answer (nothing is trained before it): recorded earlier, or a reviewer's."""
    recorded = partial(registry.plan_decision, run_id)
    if (verdict := recorded()) is not None:
        return verdict
    # The MLflow run outlives flow runs (a re-run reuses it): point `cmoe review` at this one.
    registry.tag_run(run_id, {"prefect_flow_run_name": str(flow_run.name), "prefect_flow_run_id": str(flow_run.id)})
    registry.set_plan_review(run_id, "pending")
    description = f"{plan}\n\nApprove to train it: `cmoe review approve {flow_run.name} --by NAME --reason TEXT`"
    return wait_for_answer(cfg, "plan", description, recorded,
                           lambda a: registry.decide_plan(run_id, DECIDED[a.decision], a.by, a.reason))


def wait_for_answer(cfg: CmoeConfig, key: str, description: str, recorded: Callable[[], T | None],
                    record: Callable[[ReviewInput], T]) -> T:
    """Park this run with a `ReviewInput` form until `recorded()` finds a decision or the form is answered."""
    # Prefect suspends only a deployment's own runs (a subflow sees its parent's deployment here)
    suspend = bool(cfg.flow.suspend_reviews and deployment.id and not flow_run.parent_flow_run_id)
    timeout = cfg.flow.review_timeout_s
    parked = (Suspended(timeout_seconds=timeout, pause_key=key) if suspend
              else Paused(timeout_seconds=timeout, reschedule=False, pause_key=key))
    keyset = keyset_from_paused_state(parked)
    parked.state_details.run_input_keyset = keyset
    run_id = UUID(str(flow_run.id))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        response = client.set_flow_run_state(run_id, parked)
        if response.status != SetStateStatus.ACCEPT:
            if response.state is not None and response.state.is_running():
                # This wait fired before: a suspended run started again after its form was answered.
                return _first(lambda: record(ReviewInput.load(keyset)), recorded)
            raise RuntimeError(f"flow run {flow_run.name} cannot wait for a review: {response.details}")
        ReviewInput.with_initial_data(description=description, decision="approve").save(keyset)
        while True:
            if (decided := recorded()) is not None:
                client.set_flow_run_state(run_id, Running())  # leave the pause: nothing is awaited any more
                return decided
            if suspend:
                raise Pause(state=response.state)  # the process exits; resuming the run starts it again
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_running():  # resumed: by `cmoe review` (recorded) or from the UI
                if (decided := recorded()) is not None:
                    return decided
                return _first(lambda: record(ReviewInput.load(keyset)), recorded)
            if state is None or not state.is_paused():
                raise RuntimeError(f"flow run {flow_run.name} stopped waiting for its review ({state and state.name})")
            if time.monotonic() > deadline:
                raise FlowPauseTimeout(f"no review answer within flow.review_timeout_s = {timeout} s")
            time.sleep(cfg.flow.review_poll_s)


def _first(record: Callable[[], T], recorded: Callable[[], T | None]) -> T:
    """Record an answer; when the registry refuses it because another came first, the one that did."""
    try:
        return record()
    except RegistryError as refused:
        if (first := recorded()) is None:
            raise  # refused for another reason (e.g. the champion has moved on)
        get_run_logger().warning("answer not recorded: %s", refused)
        return first


# ---------------------------------------------------------------------------- the reviewer's side
def submit_review(registry: Registry, ref: str, decision: Answer, by: str, reason: str) -> str:
    """Answer a review from outside the flow (`cmoe review approve|reject`): record it, then wake the run.

    `ref` is a version number, or the flow-run name (or id) of a run waiting on its expansion plan.
    Returns a one-line account; RegistryError when the answer is refused (another came first, ...).
    """
    if ref.isdigit():
        info = registry.decide_version(int(ref), DECIDED[decision], by, reason)
        done, run = f"version {ref}: {info.decision} by {info.decided_by}", info.tags.get("prefect_flow_run_id")
    else:
        plan = next((p for p in registry.pending_plans() if ref in (p.tags.get("prefect_flow_run_name"),
                                                                     p.tags.get("prefect_flow_run_id"))), None)
        if plan is None:
            raise RegistryError(f"no expansion plan awaits review under {ref!r} (see `cmoe review list`)")
        verdict = registry.decide_plan(plan.run_id, DECIDED[decision], by, reason)
        done, run = f"plan of {plan.task}: {verdict.decision} by {verdict.by}", plan.tags.get("prefect_flow_run_id")
    woken = _wake(run, {"decision": decision, "by": by, "reason": reason})
    return f"{done} (flow run {run} resumed)" if woken else f"{done} (recorded; no flow run is parked on it)"


def _wake(run: str | None, answer: dict[str, str]) -> bool:
    """Resume a parked run with the answer; False when none is parked (a run finds the answer in the registry)."""
    try:
        run_id = UUID(run or "")
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            return bool(state and state.is_paused()
                        and client.resume_flow_run(run_id, run_input=answer).status == SetStateStatus.ACCEPT)
    except (ValueError, ObjectNotFound, httpx.HTTPError):  # no run id, an unknown run, no Prefect API reachable
        return False
