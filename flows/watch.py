"""Prefect flow `watch_inbox`: every complete, not yet processed bundle in the inbox, in arrival order.

The inbox is a local folder or an `s3://bucket/prefix/`; a bundle counts as complete once its
`task.yaml` exists (writers put it last) and as processed once MLflow records its sha256 (a
registered version, whatever the decision, or a rejected plan). Bundles are handled strictly one
at a time, oldest first: each task builds on the champion the previous one left, so the lineage is
sequential (the deployments in `prefect.yaml` also cap each flow at one concurrent run).

The inbox is the user's: once a bundle's version is decided the watcher leaves it there, moves it
into `<inbox>/.processed/` or deletes it, as `data.after_decision` says (default: leave it).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cmoe.config import load_config
from cmoe.data.bundle import bundle_sha256
from cmoe.data.storage import BundleRef, fetch_bundle, list_bundles, put_aside
from cmoe.registry import Registry
from flows.continual import TaskOutcome, continual_task


@task(name="list-new-bundles", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def new_bundles(inbox: str, cache_dir: Path, processed: set[str]) -> list[BundleRef]:
    """Complete bundles of the inbox whose content hash MLflow has not recorded, oldest first."""
    return [ref for ref in list_bundles(inbox)
            if bundle_sha256(fetch_bundle(ref.uri, cache_dir=cache_dir)) not in processed]


@flow(name="watch-inbox")
def watch_inbox(config_path: str | None = None, inbox: str | None = None) -> list[TaskOutcome]:
    """Run `continual_task` for each new bundle, one at a time; a failed bundle does not block the rest."""
    cfg = load_config(config_path)
    inbox = inbox or cfg.inbox or str(cfg.home / "inbox")
    refs = new_bundles(inbox, cfg.home / "cache", Registry(cfg).processed_bundle_hashes())
    get_run_logger().info("%d new bundle(s) in %s: %s", len(refs), inbox, ", ".join(r.name for r in refs) or "-")
    outcomes, failed = [], []
    for ref in refs:
        state = continual_task(ref.uri, config_path, return_state=True)
        if state.is_completed():
            outcome = state.result()
            outcomes.append(outcome)
            if outcome.decision != "pending_review":  # decided: the inbox copy is the user's to keep or not
                if moved := put_aside(ref.uri, inbox, cfg.data.after_decision):
                    get_run_logger().info("%s moved to %s (data.after_decision)", ref.name, moved)
        else:
            failed.append(f"{ref.name}: {state.message}")
    if failed:
        raise RuntimeError(f"{len(failed)} bundle(s) failed (run again to resume them):\n" + "\n".join(failed))
    return outcomes
