"""Does the base see? Its answers on the style-shifted suite against the text-only answer prior.

A question that needs the image can be "answered" without it at the rate of the most frequent
answer for that question text; a base that only memorised its own renderer's images stays near
that prior on images drawn in another style (`cmoe.data.styleshift`). The prior is taken on the
scored rows themselves: no text-only answerer can do better on them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from torch import nn

from cmoe.data.writer import Record
from cmoe.model.inference import answer
from cmoe.model.processor import VLProcessor
from cmoe.stages.metrics import score


def text_prior(questions: Sequence[str], answers: Sequence[str]) -> dict[str, str]:
    """The most frequent answer per question text (ties: the alphabetically first, for determinism)."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    for q, a in zip(questions, answers):
        by_question[q][a] += 1
    return {q: min(c, key=lambda a: (-c[a], a)) for q, c in by_question.items()}


def score_against_prior(questions: Sequence[str], answers: Sequence[str], preds: Sequence[str]) -> dict:
    """Accuracy (percent, exact match) of `preds` and of the text-only prior, per question text and overall."""
    prior = text_prior(questions, answers)
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for q, a, p in zip(questions, answers, preds):
        rows[q].append((score(p, [a], "exact_match"), score(prior[q], [a], "exact_match")))

    def summary(pairs: list[tuple[float, float]]) -> dict:
        base, text = (100 * sum(x) / len(pairs) for x in zip(*pairs))
        return {"n": len(pairs), "base_acc": base, "prior_acc": text, "margin": base - text}

    return {**summary([r for pairs in rows.values() for r in pairs]),
            "per_question": {q: summary(pairs) for q, pairs in sorted(rows.items())}}


def score_styleshift(model: nn.Module, processor: VLProcessor, records: Sequence[Record], batch_size: int = 64) -> dict:
    """The base's answers on `records` (the style-shifted suite) scored against the text-only prior."""
    questions, answers = [r.question for r in records], [r.answer for r in records]
    preds = answer(model, processor, [r.image for r in records], questions, batch_size=batch_size, max_new_tokens=16)
    return {**score_against_prior(questions, answers, preds),
            "examples": [{"question": q, "ref": a, "pred": p} for q, a, p in list(zip(questions, answers, preds))[:5]]}
