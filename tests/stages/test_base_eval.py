"""Scoring the base on the style-shifted suite: its answers against the text-only prior per question text."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.data.styleshift import styleshift_split
from cmoe.model.base import load_base
from cmoe.stages.base_eval import score_against_prior, score_styleshift, text_prior

QUESTIONS = ["q1", "q1", "q1", "q2", "q2"]
ANSWERS = ["a", "a", "b", "c", "d"]


def test_the_prior_is_the_most_frequent_answer_per_question_ties_alphabetical() -> None:
    assert text_prior(QUESTIONS, ANSWERS) == {"q1": "a", "q2": "c"}


def test_answering_with_the_prior_has_no_margin_and_seeing_beats_it() -> None:
    blind = score_against_prior(QUESTIONS, ANSWERS, ["a", "a", "a", "c", "c"])
    assert blind["base_acc"] == blind["prior_acc"] == pytest.approx(60.0) and blind["margin"] == 0
    seeing = score_against_prior(QUESTIONS, ANSWERS, ANSWERS)
    assert seeing["base_acc"] == 100 and seeing["margin"] == pytest.approx(40.0)
    assert seeing["per_question"]["q1"] == {"n": 3, "base_acc": 100.0, "prior_acc": pytest.approx(200 / 3),
                                            "margin": pytest.approx(100 / 3)}


def test_the_base_is_scored_on_every_row_of_the_suite(base_dir: Path) -> None:
    model, processor = load_base(base_dir)  # the dense checkpoint of the session's base
    report = score_styleshift(model, processor, styleshift_split(0, "test", 10))
    assert report["n"] == 10 and sum(s["n"] for s in report["per_question"].values()) == 10
    assert report["margin"] == pytest.approx(report["base_acc"] - report["prior_acc"])
    assert len(report["examples"]) == 5
