"""Prefect flow `watch_inbox`: every complete, not yet processed bundle in the inbox, in arrival order.

The inbox is a local folder or an `s3://bucket/prefix/`; a bundle counts as complete once its
`task.yaml` exists (writers put it last) and as processed once MLflow records its sha256 (a
registered version, whatever the decision, or a rejected plan). Bundles are handled strictly one
at a time, oldest first: each task builds on the champion the previous one left, so the lineage is
sequential (the deployments in `prefect.yaml` also cap each flow at one concurrent run). A bundle
is known by its content, not its name: copies of one bundle under other names are one arrival,
run (or announced) once, as the oldest of them; a copy of a processed bundle is not new.

A bundle that is refused (it cannot be hashed, e.g. it holds a symlink, or it fails validation) is
recorded in `<home>/watch/refused.json` with the reason, under its fingerprint (what it holds now):
later polls skip it, without a word to the registry, until the user changes it. The other bundles
are handled as if it were not there, and a refusal does not fail the watcher.

The inbox is the user's: once a bundle's version is decided the watcher leaves it there, moves it
into `<inbox>/.processed/` or deletes it, as `data.after_decision` says (default: leave it).

With `dispatch` (the `watch-inbox` deployment of `prefect.yaml`) the watcher runs nothing itself: it
is the slow reconciler of event-driven arrival, announcing (`cmoe.bundle.ready`, flows/events.py)
each new bundle that no live run of the `continual-task` deployment already has, so a bundle that
arrived without `cmoe data push`, or whose run failed, still gets its own flow run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from cmoe.config import CmoeConfig, load_config
from cmoe.data.bundle import BundleError, bundle_sha256
from cmoe.data.storage import (
    BundleRef, StorageError, bundle_fingerprint, check_inbox, fetch_bundle, list_bundles, put_aside,
)
from cmoe.files import write_text_atomic
from cmoe.registry import Registry
from flows.continual import TaskOutcome, continual_task
from flows.events import announce, bundle_uri, bundles_in_flight

REFUSED_FILE = "refused.json"  # under <home>/watch/: {fingerprint: {"uri", "name", "reason", "at"}}
_MAX_REASON = 2000


@dataclass(frozen=True)
class Refusal:
    """A bundle the watcher will not run until it changes: where it is, what it held, and why."""

    ref: BundleRef
    fingerprint: str
    reason: str


def refused_path(cfg: CmoeConfig) -> Path:
    """Where the watcher keeps the bundles it refused."""
    return cfg.home / "watch" / REFUSED_FILE


def read_refused(path: Path) -> dict[str, dict]:
    """{fingerprint: record} of every refused bundle (empty when none, or the file is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(path: Path, refusal: Refusal) -> None:
    records = read_refused(path)
    records[refusal.fingerprint] = {"uri": refusal.ref.uri, "name": refusal.ref.name, "reason": refusal.reason,
                                    "at": datetime.now(UTC).isoformat()}
    write_text_atomic(path, json.dumps(records, indent=2, sort_keys=True))


def _reason(err: BundleError) -> str:
    text = "; ".join(str(p) for p in err.problems) or str(err)
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _io_only(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry the listing on storage and OS I/O errors only."""
    try:
        state.result()
    except StorageError:
        return True
    except OSError as err:
        return err.errno is not None
    except Exception:  # noqa: BLE001 - anything else will not go away by retrying
        return False
    return False


@task(name="list-new-bundles", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=_io_only)
def new_bundles(inbox: str, cache_dir: Path, processed: set[str],
                refused: dict[str, dict]) -> tuple[dict[BundleRef, str], list[Refusal], list[str]]:
    """(complete bundles of the inbox whose content hash MLflow has not recorded, oldest first, with that
    hash; the bundles refused now because they cannot be hashed; the names of those refused earlier and unchanged)."""
    new, bad, skipped = {}, [], []
    for ref in list_bundles(inbox):
        fingerprint = bundle_fingerprint(ref.uri)
        if fingerprint in refused:
            skipped.append(ref.name)
            continue
        try:
            sha = bundle_sha256(fetch_bundle(ref.uri, cache_dir=cache_dir))
        except BundleError as err:
            bad.append(Refusal(ref, fingerprint, _reason(err)))
            continue
        if sha not in processed:
            new[ref] = sha
    return new, bad, skipped


def by_content(new: dict[BundleRef, str]) -> dict[str, list[BundleRef]]:
    """{content hash: its bundles, oldest first}, oldest content first: copies of one bundle under
    other names are one arrival (learned once, as the oldest of them)."""
    groups: dict[str, list[BundleRef]] = {}
    for ref, sha in new.items():
        groups.setdefault(sha, []).append(ref)
    return groups


@task(name="announce-new-bundles", cache_policy=NO_CACHE)
def announce_new(new: dict[BundleRef, str]) -> list[str]:
    """Send `cmoe.bundle.ready` once per new content that no live run of the deployment has (under any of
    its names); the names announced."""
    logger, in_flight, announced = get_run_logger(), bundles_in_flight(), []
    for sha, refs in by_content(new).items():
        if live := [r.name for r in refs if bundle_uri(r.uri) in in_flight]:
            logger.info("%s: a run of the continual-task deployment already has it", live[0])
            continue
        announce(refs[0].uri, sha, refs[0].name, "watch-inbox")
        announced.append(refs[0].name)
    return announced


@flow(name="watch-inbox")
def watch_inbox(config_path: str | None = None, inbox: str | None = None, dispatch: bool = False) -> list[TaskOutcome]:
    """Run `continual_task` for each new bundle, one at a time; a failed or refused bundle does not block the rest.
    With `dispatch`, announce each one to the `continual-task` deployment instead (its own flow run; returns [])."""
    cfg = load_config(config_path)
    inbox = inbox or cfg.inbox or str(cfg.home / "inbox")
    logger = get_run_logger()
    check_inbox(inbox)
    log = refused_path(cfg)
    earlier = read_refused(log)
    refs, refused, skipped = new_bundles(inbox, cfg.home / "cache", Registry(cfg).processed_bundle_hashes(), earlier)
    if skipped:
        logger.info("skipping %d bundle(s) refused earlier and unchanged (see %s): %s", len(skipped), log,
                    ", ".join(skipped))
    for refusal in refused:
        _refuse(log, refusal)
    logger.info("%d new bundle(s) in %s: %s", len(refs), inbox, ", ".join(r.name for r in refs) or "-")
    if dispatch:
        logger.info("announced %s", ", ".join(announce_new(refs)) or "none")
        return []
    outcomes, failed = [], []
    for ref, *copies in by_content(refs).values():
        if copies:
            logger.info("%s: the same content as %s, learned once", ", ".join(c.name for c in copies), ref.name)
        state = continual_task(ref.uri, config_path, return_state=True)
        if state.is_completed():
            outcome = state.result()
            outcomes.append(outcome)
            if outcome.decision != "pending_review":  # decided: the inbox copy is the user's to keep or not
                if moved := put_aside(ref.uri, inbox, cfg.data.after_decision):
                    logger.info("%s moved to %s (data.after_decision)", ref.name, moved)
        elif state.is_failed() and isinstance(err := state.result(raise_on_failure=False), BundleError):
            # Invalid: retrying cannot help. Nothing was registered (validation precedes every MLflow write).
            _refuse(log, Refusal(ref, bundle_fingerprint(ref.uri), _reason(err)))
        else:
            failed.append(f"{ref.name}: {state.message}")
    if failed:
        raise RuntimeError(f"{len(failed)} bundle(s) failed (run again to resume them):\n" + "\n".join(failed))
    return outcomes


def _refuse(log: Path, refusal: Refusal) -> None:
    _record(log, refusal)
    get_run_logger().warning("refused %s: %s (recorded in %s; skipped until the bundle changes)",
                             refusal.ref.name, refusal.reason, log)
