"""A `continual-task` run killed inside each stage of one task arrival, then started again: it resumes, ends
where an uninterrupted run ends, and never loads a torn file.

One lineage, one bundle: a run in a process of its own (tests/orchestration/flow_process.py) is killed
with SIGKILL in the probe, in the expansion once a checkpoint is recorded (between checkpoints, or while
the next is written: the exact mid-write point is tests/stages/test_checkpoint_hashes.py's), in the
evaluation and in the registration; the next run of the same bundle goes one stage further, the last one
finishes. A kill waits for what the stage itself writes first (its folder; the expansion's checkpoint
hashes), so it lands inside the stage, and every assertion holds wherever inside the stage it lands. The
uninterrupted run is the session watcher's first task (`watched`: the same bundle and results config).

Each run holds a lineage slot of its own name: on a Prefect server a killed holder's slot is freed only
once its 300 s lease lapses; without a server (`cmoe run` on its own) the slot is a kernel lock, freed as
the holder dies (tests/orchestration/test_lineage_slot.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prefect.settings import get_current_settings
from safetensors.torch import load_file

from cmoe.config import load_config
from cmoe.model.state import verify_state
from cmoe.registry import Registry, VersionInfo
from cmoe.stages.trainer import HASHES
from flows.continual import DONE

from .flow_process import start_continual_task

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

STAGE_LIMIT_S = 300  # a stage of the tiny task is reached within seconds, or something is wrong
Done = dict[str, tuple[int, int, bytes]]  # stage -> its done.json's (inode, mtime, bytes)


@dataclass
class KillPoint:
    """Kill the run inside `stage` once `ready(the arrival's folder of stages)` holds."""

    stage: str
    ready: Callable[[Path], bool]


def logging_the_model(runs: Path) -> bool:
    """The registration has begun writing the candidate's model into the artifact store (home/mlartifacts)."""
    return any((runs.parents[1] / "mlartifacts" / "models").glob("*/artifacts/*"))


KILL_POINTS = [
    KillPoint("probe", lambda runs: (runs / "probe").is_dir()),  # `resumable` makes it as the stage starts
    KillPoint("expand", lambda runs: (runs / "expand" / "checkpoints" / HASHES).is_file()),  # one recorded
    KillPoint("evaluate", lambda runs: (runs / "evaluate").is_dir()),
    # then the version is registered (its tags in the same write), given its card and the `candidate` alias
    KillPoint("gate", logging_the_model),
]


@dataclass
class Killed:
    """What one killed run left, read once it was dead."""

    stage: str
    finished_before: Done  # the stages finished when it started
    finished_after: Done
    recorded_step: int | None  # the newest recorded expansion checkpoint: where a re-run must resume


@dataclass
class Lineage:
    """A config's home after its `cmoe run`s, and where the task arrival's stages are."""

    config: str
    runs: Path

    def version(self) -> VersionInfo:
        return Registry(load_config(self.config)).version(1)


def finished(runs: Path) -> Done:
    """Each finished stage's done.json as (inode, mtime, bytes): unchanged after a re-run = reused, not redone."""
    return {done.parent.name: (done.stat().st_ino, done.stat().st_mtime_ns, done.read_bytes())
            for done in runs.glob(f"*/{DONE}")}


def newest_recorded_step(runs: Path) -> int | None:
    """The newest expansion checkpoint whose hashes were recorded (None: none left)."""
    hashes = runs / "expand" / "checkpoints" / HASHES
    if not hashes.is_file():
        return None
    return max((int(tag.removeprefix("step")) for tag in json.loads(hashes.read_text())
                if (hashes.parent / tag).is_dir()), default=None)


def config_for(reference: str, home: Path, name: str) -> str:
    """The reference run's config with another home and lineage slot (neither changes a stage's result)."""
    data = yaml.safe_load(Path(reference).read_text())
    data["home"], data["inbox"], data["flow"]["lineage_limit"] = str(home), None, f"cmoe-lineage-{name}"
    path = home.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def kill_when(run: BaseProcess, ready: Callable[[], bool], what: str, log: Path) -> None:
    """SIGKILL the run the moment `ready()` holds (polled; the stage lasts seconds)."""
    deadline = time.monotonic() + STAGE_LIMIT_S
    while not ready():
        if not run.is_alive() or time.monotonic() > deadline:
            run.kill()
            run.join()
            raise AssertionError(f"the run never reached {what} (exit {run.exitcode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    assert run.exitcode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(watched: tuple[str, list[Any], list[Any]]) -> Lineage:
    """The session watcher's lineage: its first version learned the bundle in one run nobody killed."""
    config = watched[0]
    key = Registry(load_config(config)).version(1).tags["cmoe.key"]
    return Lineage(config, load_config(config).home / "runs" / key)


@pytest.fixture(scope="module")
def killed(suite: list[Path], uninterrupted: Lineage,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Lineage, list[Killed]]:
    """The task learned by runs killed at each kill point in turn, then one left to finish."""
    home = tmp_path_factory.mktemp("killed") / "home"
    runs = home / "runs" / uninterrupted.runs.name  # same bundle, champion, results config: same key
    api = str(get_current_settings().api.url)
    kills = []
    for point in KILL_POINTS:
        before, log = finished(runs), home.parent / f"killed-in-{point.stage}.log"
        run = start_continual_task(suite[0], config_for(uninterrupted.config, home, point.stage), api, log)
        kill_when(run, partial(point.ready, runs), point.stage, log)
        kills.append(Killed(point.stage, before, finished(runs), newest_recorded_step(runs)))
    config, log = config_for(uninterrupted.config, home, "last"), home.parent / "last.log"
    last = start_continual_task(suite[0], config, api, log)
    last.join(STAGE_LIMIT_S)
    assert last.exitcode == 0, log.read_text()[-3000:]
    return Lineage(config, runs), kills


def test_each_kill_lands_inside_its_stage_and_leaves_no_torn_file(killed: tuple[Lineage, list[Killed]]) -> None:
    _, kills = killed
    for kill in kills:
        assert kill.stage not in kill.finished_after, f"the kill meant for {kill.stage} came after it finished"
        for _, _, done in kill.finished_after.values():  # what a re-run reads back is whole
            json.loads(done)
    lineage, _ = killed
    verify_state(lineage.runs / "expand" / "state")  # the state the evaluation and registration loaded


def test_each_rerun_reuses_the_stages_finished_before_it(killed: tuple[Lineage, list[Killed]]) -> None:
    lineage, kills = killed
    for earlier, later in zip(kills, kills[1:]):
        assert earlier.stage in later.finished_after, f"the run after the kill in {earlier.stage} did not finish it"
    for kill in kills:
        kept = {stage: kill.finished_after[stage] for stage in kill.finished_before}
        assert kept == kill.finished_before, f"the run killed in {kill.stage} redid a finished stage"
    last = finished(lineage.runs)
    assert {stage: last[stage] for stage in kills[-1].finished_after} == kills[-1].finished_after


def test_the_expansion_resumes_from_its_newest_recorded_checkpoint(killed: tuple[Lineage, list[Killed]]) -> None:
    lineage, kills = killed
    (in_expand,) = (kill for kill in kills if kill.stage == "expand")
    train = json.loads((lineage.runs / "expand" / DONE).read_text())["train"]
    assert train["resumed_from_step"] == in_expand.recorded_step  # None only if it was killed after training


def test_the_version_equals_an_uninterrupted_runs(killed: tuple[Lineage, list[Killed]],
                                                  uninterrupted: Lineage) -> None:
    lineage, _ = killed
    registry = Registry(load_config(lineage.config))
    assert [v.version for v in registry.versions()] == [1] and registry.champion().version == 1  # registered once
    got, want = lineage.version(), uninterrupted.version()
    assert (got.decision, got.decided_by, got.parent_version) == (want.decision, want.decided_by, None)
    assert (got.acc, got.metrics, got.gate) == (want.acc, want.metrics, want.gate)
    assert got.card.splitlines()[0] == want.card.splitlines()[0]  # its model card, given after registering
    registry.verify_loadable(1)  # the logged model the version names is whole (manifest, base, every delta)
    assert plan(lineage) == plan(uninterrupted)
    assert_same_state(lineage.runs / "expand" / "state", uninterrupted.runs / "expand" / "state")


def plan(lineage: Lineage) -> dict[str, Any]:
    """The probe's expansion plan: layer -> experts to add."""
    return json.loads((lineage.runs / "probe" / DONE).read_text())["plan"]


def assert_same_state(got: Path, want: Path) -> None:
    """The same tasks, experts and tensors (within 1e-6: an expansion resumed from a checkpoint)."""
    a, b = verify_state(got), verify_state(want)
    assert (a["tasks"], a["experts"], a["moe"]) == (b["tasks"], b["experts"], b["moe"])
    for task, deltas in b["deltas"].items():
        for kind in deltas:
            mine, theirs = (load_file(root / "tasks" / task / f"{kind}.safetensors") for root in (got, want))
            assert mine.keys() == theirs.keys()
            for name, tensor in theirs.items():
                assert torch.allclose(mine[name], tensor, rtol=0, atol=1e-6), f"{task}/{kind}: {name}"
