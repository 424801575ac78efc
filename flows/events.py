"""The event `cmoe.bundle.ready`: a complete bundle is in an inbox. This module owns its name, resource and payload.

`cmoe data push` sends it once the upload is complete; the watcher (`watch_inbox(dispatch=True)`)
sends it for bundles that arrived another way. The `continual-task` deployment of `prefect.yaml`
has a trigger on it that starts one flow run per event, `bundle_uri` taken from the payload:

    resource  prefect.resource.id = cmoe.bundle.<sha256>, prefect.resource.name = the bundle's folder name
    payload   bundle_uri (absolute for a local folder), sha256, announced_by (`cmoe data push` / `watch-inbox`)

An event only means something to a Prefect server that holds that deployment, so without a Prefect
API (`PREFECT_API_URL` unset) nothing is sent: Prefect's ephemeral mode would start a temporary
local API for the one event, and no deployment, trigger or worker listens there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.clients import get_events_client
from prefect.events.schemas.events import Event
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from cmoe.data.storage import is_s3

BUNDLE_READY = "cmoe.bundle.ready"
RESOURCE_PREFIX = "cmoe.bundle."  # + the bundle's sha256: one resource per bundle content
DEPLOYMENT = "continual-task/continual-task"  # the deployment of prefect.yaml whose trigger expects the event
SEND_RETRIES = 2  # reconnections before giving up: an unreachable server answers within a second or two
# A run in one of these states will handle its bundle (or already waits for its review): no second one.
LIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


class NotAnnounced(RuntimeError):
    """The event was not sent: no Prefect API is configured, or the server did not take it."""


def bundle_uri(uri: str | Path) -> str:
    """The URI a run is started with: s3:// as it is, a local folder made absolute (a worker has another cwd)."""
    return str(uri) if is_s3(uri) else str(Path(uri).resolve())


def bundle_event(uri: str | Path, sha256: str, name: str, announced_by: str) -> Event:
    """The `cmoe.bundle.ready` event of one complete bundle."""
    return Event(event=BUNDLE_READY,
                 resource={"prefect.resource.id": RESOURCE_PREFIX + sha256, "prefect.resource.name": name},
                 payload={"bundle_uri": bundle_uri(uri), "sha256": sha256, "announced_by": announced_by})


def announce(uri: str | Path, sha256: str, name: str, announced_by: str) -> Event:
    """Send the bundle's event and wait until the server has received it; NotAnnounced if it could not."""
    if get_current_settings().api.url is None:
        raise NotAnnounced("no Prefect API configured (PREFECT_API_URL unset), so no event was sent: Prefect's "
                           "ephemeral mode would start a temporary local API that no deployment listens to")
    event = bundle_event(uri, sha256, name, announced_by)
    try:
        run_coro_as_sync(_send(event))
    except Exception as err:  # noqa: BLE001 - websockets, OS and HTTP errors alike: the event did not arrive
        raise NotAnnounced(f"the Prefect server did not take the event ({type(err).__name__}: {err})") from None
    return event


async def _send(event: Event) -> None:
    # Its own warning on failure speaks of lost task-run data; NotAnnounced says what was not sent.
    quiet = logging.getLogger("prefect.events.clients")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # checkpoint_every=1: after the send, a ping's pong confirms the server has read the message.
        async with get_events_client(reconnection_attempts=SEND_RETRIES, checkpoint_every=1) as client:
            await client.emit(event)
    finally:
        quiet.setLevel(level)


def bundles_in_flight() -> set[str]:
    """bundle_uri of every run of the deployment that is scheduled, waiting, running or paused for review."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            raise RuntimeError(f"no deployment {DEPLOYMENT} on the Prefect API, so nothing would run an announced "
                               "bundle: `prefect deploy --all` from the repository root first") from None
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=LIVE_STATES))))
    return {str(run.parameters.get("bundle_uri")) for run in runs}
