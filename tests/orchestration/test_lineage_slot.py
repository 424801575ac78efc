"""One lineage at a time: the Prefect global concurrency limit every champion-building flow holds."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from flows.lineage_slot import file_slot, lineage_slot


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


def test_without_a_prefect_server_the_slot_is_a_kernel_lock_beside_the_local_database(tmp_path: Path) -> None:
    """A local API runs no repossessor: a killed holder's lease would never lapse, the kernel's lock does
    (a killed `cmoe run` freeing it: tests/orchestration/test_killed_stages.py)."""
    lock = tmp_path / "lineage-slots" / "cmoe-lineage-local.lock"
    with temporary_settings(updates={PREFECT_HOME: tmp_path}, restore_defaults={PREFECT_API_URL}):
        with lineage_slot("cmoe-lineage-local"):
            with pytest.raises(TimeoutError, match="still held"):
                with file_slot(lock, timeout_s=0.1):  # another holder of the same lock: refused
                    pass
    with file_slot(lock, timeout_s=0):  # free again once the block is left
        pass


def test_a_local_slot_is_free_the_moment_its_holder_is_killed(tmp_path: Path) -> None:
    lock = tmp_path / "cmoe-lineage.lock"
    held, tell = os.pipe()
    holder = os.fork()
    if holder == 0:  # the holder: takes the slot, says so, waits to be killed (never returns into pytest)
        try:
            with file_slot(lock):
                os.write(tell, b"held")
                signal.pause()
        finally:
            os._exit(1)
    assert os.read(held, 4) == b"held"
    with pytest.raises(TimeoutError):
        with file_slot(lock, timeout_s=0):
            pass
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    os.close(held)
    os.close(tell)
    with file_slot(lock, timeout_s=0):  # no lease to wait out: the kernel let it go with the process
        pass
