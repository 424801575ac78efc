"""One lineage at a time: the Prefect global concurrency limit every champion-building flow holds."""

from __future__ import annotations

import threading

import pytest
from prefect.client.orchestration import get_client

from flows.lineage_slot import lineage_slot


def test_the_limit_is_created_with_one_slot_on_first_use(prefect_api: None) -> None:
    with lineage_slot("cmoe-lineage-created"):
        pass
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("cmoe-lineage-created")
    assert limit.limit == 1 and limit.active and limit.active_slots == 0  # released on leaving the block


def test_a_second_run_cannot_enter_while_the_first_holds_the_slot(prefect_api: None) -> None:
    name = "cmoe-lineage-held"
    entered, leave = threading.Event(), threading.Event()

    def first() -> None:
        with lineage_slot(name):
            entered.set()
            leave.wait()

    holder = threading.Thread(target=first)
    holder.start()
    assert entered.wait(120)
    try:
        with pytest.raises(TimeoutError):  # certain, not a race: the slot is held until `leave`
            with lineage_slot(name, timeout_s=2):
                pass
    finally:
        leave.set()
        holder.join()
    with lineage_slot(name, timeout_s=120):  # free again once the first one left
        pass


def test_another_lineage_has_its_own_slot(prefect_api: None) -> None:
    with lineage_slot("cmoe-lineage-a"), lineage_slot("cmoe-lineage-b", timeout_s=60):
        pass
