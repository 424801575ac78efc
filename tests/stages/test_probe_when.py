"""PGKE's *when*: a task the lineage already knows gets an empty plan and trains no expert; a new one grows."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmoe.config import CmoeConfig, ProbeConfig
from cmoe.data import synth
from cmoe.data.validate import ValidatedBundle, open_bundle
from cmoe.data.writer import write_bundle
from cmoe.model.cmoe_layer import cmoe_layers
from cmoe.model.state import load_state
from cmoe.stages.expand import run_expand
from cmoe.stages.probe import run_probe

from .conftest import LEARNING, stage_config

pytestmark = pytest.mark.slow  # module fixtures train lineages

WHEN = {"min_gain": ProbeConfig().min_gain, "serves_at": ProbeConfig().serves_at, "max_layer_share": 1.0,
        "router_steps": 20, "steps": 20}


@dataclass
class Known:
    cfg: CmoeConfig
    learned: Path  # state after color-name
    known: ValidatedBundle  # color-name's images and answers, asked in hue-name's words
    new: ValidatedBundle  # count-shapes: a skill no expert has


@pytest.fixture(scope="module")
def known(tiny_suite: list[Path], learning_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Known:
    """color-name learned on the learning base; the same skill re-worded, and a new skill, to probe."""
    root = tmp_path_factory.mktemp("when")
    cfg = stage_config(root / "home", learning_base, **{**LEARNING, "probe": WHEN, "expand": {"epochs": 30}})
    suite = tiny_suite[0].parent
    color = open_bundle(suite / "02-color-name", cache_dir=cfg.home / "cache")
    tasks = {t.name: t for t in synth.COIN_MINI}
    # hue-name's wordings over color-name's own rows (same random stream: same images, same answers)
    rows = {split: synth._task_records(tasks["hue-name"], random.Random(f"0/color-name/{split}"), n)
            for split, n in (("train", 64), ("test", 16))}
    spec = {"name": "hue-again", "format_version": 1, "metric": "exact_match", "description": "color-name re-worded"}
    again = open_bundle(write_bundle(root / "hue-again", spec, rows), cache_dir=cfg.home / "cache")
    plan = run_probe(cfg, color, None, root / "color" / "probe")
    learned = run_expand(cfg, color, None, plan, root / "color" / "expand")
    new = open_bundle(suite / "03-count-shapes", cache_dir=cfg.home / "cache")
    return Known(cfg, Path(learned.state_dir), again, new)


def test_a_task_the_lineage_knows_gets_an_empty_plan(known: Known, tmp_path: Path) -> None:
    report = run_probe(known.cfg, known.known, known.learned, tmp_path / "probe")
    assert report.router_start == "color-name"  # its router starts where its skill is:
    assert report.start_losses["color-name"] < report.start_losses["base"]  # the lineage's experts have it
    probe = known.cfg.probe  # and the probes add (almost) nothing to what the pool does with it
    assert report.gain < probe.min_gain and report.loss_pool - report.loss_probes < probe.min_loss_drop, report
    assert report.plan == {} and report.params_to_add == 0


def test_an_empty_plan_trains_the_router_and_no_expert(known: Known, tmp_path: Path) -> None:
    report = run_probe(known.cfg, known.known, known.learned, tmp_path / "probe")
    expanded = run_expand(known.cfg, known.known, known.learned, report, tmp_path / "expand")
    before, after = load_state(known.learned), load_state(expanded.state_dir)
    assert expanded.params_added == 0 and expanded.train["steps"] > 0
    for i, layer in cmoe_layers(after).items():
        assert len(layer.experts) == len(cmoe_layers(before)[i].experts)
        assert "hue-again" not in layer.expert_origin and len(layer.routers) == 2  # its own router, no expert


def test_a_task_that_needs_a_new_skill_grows(known: Known, tmp_path: Path) -> None:
    report = run_probe(known.cfg, known.new, known.learned, tmp_path / "probe")
    probe = known.cfg.probe  # on the tiny model the probes lower the loss long before any answer is right
    assert report.gain >= probe.min_gain or report.loss_pool - report.loss_probes >= probe.min_loss_drop, report
    assert report.plan, report
