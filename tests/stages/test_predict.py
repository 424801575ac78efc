"""Predict: locator-routed answers for (image, question) rows of a saved state, decoded as the config says."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from cmoe.config import EvalConfig
from cmoe.stages.predict import predict_rows

from .conftest import Lineage


def _rows(bundle: Path) -> tuple[list[Image.Image], list[str]]:
    images = [Image.open(p) for p in sorted((bundle / "test").rglob("*.png"))[:8]]
    return images, ["what color is the shape?"] * len(images)


def test_answers_stop_at_the_configs_eval_max_new_tokens(lineage: Lineage, tiny_suite: list[Path]) -> None:
    images, questions = _rows(tiny_suite[0])
    long, short = (predict_rows(lineage.cfg.model_copy(update={"eval": EvalConfig(max_new_tokens=n)}),
                                lineage.state(1), images, questions) for n in (8, 1))
    assert [r["task"] for r in short] == [r["task"] for r in long]  # the same routing, only cut short
    assert all(b["answer"].startswith(a["answer"]) for a, b in zip(short, long))  # greedy: a prefix
    assert [r["answer"] for r in short] != [r["answer"] for r in long]
    # each answer says how sure the locator was: its margin over the second-best task, at most its probability
    assert all(0.0 <= r["margin"] <= r["confidence"] <= 1.0 for r in long)
