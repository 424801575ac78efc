"""`cmoe predict`'s answer line: how the answer was routed, and UNSURE when the locator's margin is small."""

from __future__ import annotations

from cmoe.cli.serve import answer_line


def test_a_sure_answer_shows_its_task_confidence_and_margin() -> None:
    line = answer_line({"answer": "red", "task": "color", "confidence": 0.9, "margin": 0.8}, min_margin=0.1)
    assert line == "red  (task color, confidence 0.90, margin 0.80)"


def test_an_answer_below_the_gates_margin_is_flagged_unsure() -> None:
    line = answer_line({"answer": "red", "task": "color", "confidence": 0.52, "margin": 0.04}, min_margin=0.1)
    assert line.startswith("red  (task color, confidence 0.52, margin 0.04)  UNSURE")
    assert "gate.min_locator_margin 0.10" in line


def test_a_single_router_model_answers_without_routing_details() -> None:
    assert answer_line({"answer": "red", "task": None, "confidence": None, "margin": None}, min_margin=0.1) == "red"
