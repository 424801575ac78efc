"""A `continual-task` run in a process of its own, for tests that kill it (tests/orchestration/test_killed_stages.py).

The process is forked from a forkserver that imported the flow and its stages once, and it talks to the
session's Prefect API: a fresh `cmoe run` would spend most of a test's time importing torch, MLflow and
Prefect (~45 s on two busy cores) and starting a local Prefect API (~30 s) before its first stage.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.process import BaseProcess
from pathlib import Path

# imported by the forkserver, once: what each run would otherwise import itself
# set in this pytest process by a training that ran in it (rank 0 of 1, its port still held): never inherited
RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
PRELOAD = ["flows.continual", "cmoe.stages.probe", "cmoe.stages.expand", "cmoe.stages.launch", "cmoe.stages.evaluate",
           "cmoe.stages.kpi", "cmoe.stages.gate"]


def start_continual_task(bundle: Path, config: str, api_url: str, log: Path) -> BaseProcess:
    """Start `continual_task(bundle, config)` against the Prefect API at `api_url`, its output into `log`."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *PRELOAD])
    process = context.Process(target=_run, args=(str(bundle), config, api_url, str(log)), daemon=True)
    process.start()
    return process


def _run(bundle: str, config: str, api_url: str, log: str) -> None:
    """The process's body: the flow, exactly as `cmoe run` calls it, on the given Prefect API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.continual import continual_task

    for name in RANK_ENV:
        os.environ.pop(name, None)
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        continual_task(bundle, config)
