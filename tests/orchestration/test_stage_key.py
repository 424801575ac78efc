"""A task arrival's stage key: finished stages are reused only for the same bundle, champion and results config,
and only when their stored result has every field this version's result has."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmoe.config import CmoeConfig
from flows.continual import DONE, resumable, stage_key

SHA = "ab" * 32


def key(**overrides: dict) -> str:
    return stage_key(SHA, 3, CmoeConfig.model_validate({"home": Path("h"), **overrides}))


@pytest.mark.parametrize("change", [
    {"probe": {"tau": 0.3}}, {"probe": {"min_gain": 0.2}}, {"expand": {"epochs": 2}}, {"expand": {"seed": 1}},
    {"locator": {"temperature": 2.0}}, {"moe": {"top_k": 1}}, {"base": {"path": "/models/llava"}},
    {"eval": {"max_new_tokens": 4}}, {"data": {"eval_keep": 50}}, {"compact": {"max_drop": 3.0}},
    {"probe": {"tau_scale": 0.5}}, {"base": {"dtype": "bfloat16"}}, {"base": {"attn_implementation": "eager"}},
], ids=lambda c: next(f"{s}.{f}" for s, v in c.items() for f in v))
def test_a_config_value_that_changes_a_result_is_new_work(change: dict) -> None:
    assert key(**change) != key()


@pytest.mark.parametrize("change", [
    {"data": {"after_decision": "move"}}, {"data": {"keep_train_cache": True}}, {"expand": {"checkpoint_every": 7}},
    {"gate": {"max_forgetting": 1.0}}, {"flow": {"review_poll_s": 3}}, {"registry": {"experiment": "other"}},
    {"expand": {"log_every": 3}}, {"kpi": {"cost_per_device_hour": 9.0}}, {"expand": {"gradient_checkpointing": True}},
], ids=lambda c: next(f"{s}.{f}" for s, v in c.items() for f in v))
def test_a_value_that_changes_no_stage_result_reuses_the_work(change: dict) -> None:
    assert key(**change) == key()


def test_the_bundle_and_the_champion_name_the_work() -> None:
    cfg = CmoeConfig()
    assert stage_key(SHA, 3, cfg) != stage_key(SHA, 4, cfg) != stage_key("cd" * 32, 4, cfg)


@dataclass
class Result:
    answer: int
    margin: list[float] = field(default_factory=list)


def test_a_finished_stage_is_read_back_instead_of_computed(tmp_path: Path) -> None:
    resumable(tmp_path, Result, lambda _: Result(1, [0.5]))
    assert resumable(tmp_path, Result, lambda _: Result(2)) == Result(1, [0.5])


def test_a_result_an_older_version_wrote_without_a_new_field_is_computed_again(tmp_path: Path) -> None:
    (tmp_path / DONE).write_text(json.dumps({"answer": 1}))
    assert resumable(tmp_path, Result, lambda _: Result(2, [0.5])) == Result(2, [0.5])
