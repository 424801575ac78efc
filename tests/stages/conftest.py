"""Stage fixtures: one tiny two-task suite, one tiny base and one two-task lineage per test session.

Everything expensive is built once (session scope) and shared read-only; a test that writes gets
its own home through `make_cfg`. Sizes come from `tiny_test_config`: every stage runs in seconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cmoe.env import apply_defaults

apply_defaults()  # offline Hugging Face, no telemetry: as the CLI runs

import pytest  # noqa: E402

from cmoe.config import CmoeConfig, tiny_test_config  # noqa: E402
from cmoe.data.validate import ValidatedBundle  # noqa: E402


def stage_config(home: Path, base: Path, **sections: dict) -> CmoeConfig:
    """tiny_test_config at `home`, on the shared base, with `sections` = {"probe": {"tau": 0.0}, ...} applied."""
    cfg = tiny_test_config(home)
    cfg.base.path = str(base)
    for section, fields in sections.items():
        for key, value in fields.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def suite(tiny_suite: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[ValidatedBundle]:
    """The first two bundles of the session's tiny coin-mini (tests/conftest.py), validated once."""
    from cmoe.data.validate import open_bundle

    cache = tmp_path_factory.mktemp("suite-cache")
    return [open_bundle(p, cache_dir=cache) for p in tiny_suite]


@pytest.fixture(scope="session")
def base_dir(tiny_base: Path) -> Path:
    """The session's tiny pretrained base (tests/conftest.py)."""
    return tiny_base


# A base on which the tiny tasks are learned, not just run: the session's base (one pretraining
# epoch) scores 0 % on every task. 60 epochs over the same tiny corpus (~15 s) give a base that can
# spell the answer words; top-2 routing and 12 expansion epochs let a task learn its answer format
# (measured: tests/stages/test_bench.py).
LEARNING_BASE = {"pretrain_epochs": 60, "pretrain_lr": 3e-3}
LEARNING = {"moe": {"top_k": 2}, "expand": {"epochs": 12}, "eval": {"max_new_tokens": 8}}


@pytest.fixture(scope="session")
def learning_base(tiny_suite: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base of LEARNING_BASE (with LEARNING's MoE layout), built once per session."""
    from cmoe.stages.pretrain import build_base

    root = tmp_path_factory.mktemp("learning-base")
    cfg = stage_config(root / "home", root / "base", **LEARNING)
    cfg.base = cfg.base.model_copy(update=LEARNING_BASE)
    built = build_base(cfg.base, root / "base", corpus=tiny_suite[0].parent / "pretrain", cache_dir=root / "cache",
                       moe=cfg.moe)
    return Path(built.path)


@pytest.fixture
def make_cfg(base_dir: Path, tmp_path: Path) -> Callable[..., CmoeConfig]:
    """make_cfg(probe={...}, gate={...}) -> a tiny config with its own home under tmp_path."""
    return lambda **sections: stage_config(tmp_path / "home", base_dir, **sections)


@dataclass
class Lineage:
    """Two tasks learned in order; task 1 grows 2 experts in layer 0, task 2 one in layer 1 (the
    experts form of growth; tests/stages/test_expand_delta.py grows deltas)."""

    cfg: CmoeConfig
    bundles: list[ValidatedBundle]
    names: list[str]
    probes: list  # ProbeReport per task, with the plan above
    expands: list  # ExpandResult per task

    def state(self, i: int) -> Path:
        return Path(self.expands[i].state_dir)


PLANS = ({"0": 2}, {"1": 1})  # fixed plans: the expansion must follow exactly what it is given


@pytest.fixture(scope="session")
def lineage(suite: list[str], base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """Probe + expand task 1 on the base, then task 2 on task 1's state (read-only for tests);
    each task's evaluation set is kept under `<root>/evalsets`, as the flow keeps it."""
    from cmoe.data.evalsets import keep_eval_set
    from cmoe.stages.expand import run_expand
    from cmoe.stages.probe import expert_size, run_probe
    from cmoe.stages.common import open_lineage

    root = tmp_path_factory.mktemp("lineage")
    cfg = stage_config(root / "home", base_dir, expand={"growth": "experts"})
    size = expert_size(open_lineage(cfg, None)[0])
    parent, probes, expands, names = None, [], [], []
    for i, (bundle, plan) in enumerate(zip(suite, PLANS)):
        probe = run_probe(cfg, bundle, parent, root / f"{i}" / "probe")
        probe = replace(probe, plan=plan, params_to_add=sum(plan.values()) * size)
        kept = keep_eval_set(bundle, str(root / "evalsets"), cache_dir=cfg.home / "cache")
        expanded = run_expand(cfg, bundle, parent, probe, root / f"{i}" / "expand", eval_set=kept)
        probes.append(probe)
        expands.append(expanded)
        names.append(probe.task)
        parent = Path(expanded.state_dir)
    return Lineage(cfg, list(suite), names, probes, expands)
