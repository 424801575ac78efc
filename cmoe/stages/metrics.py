"""Answer scoring (CoIN's metrics) and continual-learning summaries of an accuracy matrix.

Accuracy matrix convention: `A[i][j]` = accuracy (percent) on task j after learning task i, for
j <= i (lower triangle); entries above the diagonal are None.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (VQA-style normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def score(pred: str, answers: Sequence[str], metric: str) -> float:
    """Score one prediction in [0, 1] against the accepted answers, by the task's metric."""
    p = normalize(pred)
    refs = [normalize(a) for a in answers]
    if metric == "exact_match":
        return float(p in refs)
    if metric == "contains":  # CoIN's ImageNet rule: substring either way
        return float(any(p and (r in p or p in r) for r in refs))
    if metric == "vqa_soft":  # VQA accuracy: an answer given by 3 annotators counts fully
        return min(1.0, sum(p == r for r in refs) / 3.0)
    raise ValueError(f"unknown metric {metric!r}; use exact_match, contains or vqa_soft")


def _final_row(matrix: list[list[float | None]]) -> list[float]:
    last = matrix[-1]
    return [a for a in last if a is not None]


def avg_acc(matrix: list[list[float | None]]) -> float:
    """Final average accuracy (Avg; MCITlib's MFN, mean final accuracy): mean over tasks of A[T][j]."""
    row = _final_row(matrix)
    return sum(row) / len(row)


def mft(matrix: list[list[float | None]]) -> float | None:
    """Mean fine-tuned accuracy (MCITlib's MFT): mean over tasks of A[j][j], each right after learning it."""
    diag = [row[j] for j, row in enumerate(matrix) if row[j] is not None]
    return sum(diag) / len(diag) if diag else None


def bwt(matrix: list[list[float | None]]) -> float | None:
    """Backward transfer: mean over old tasks of A[T][j] - A[j][j] (negative = forgetting)."""
    t = len(matrix) - 1
    if t == 0:
        return 0.0
    vals = [matrix[t][j] - matrix[j][j] for j in range(t) if matrix[j][j] is not None]
    return sum(vals) / len(vals) if vals else None


def forgetting(matrix: list[list[float | None]]) -> float | None:
    """Mean over old tasks of (best earlier accuracy - final accuracy)."""
    t = len(matrix) - 1
    if t == 0:
        return 0.0
    vals = []
    for j in range(t):
        earlier = [matrix[i][j] for i in range(j, t) if matrix[i][j] is not None]
        if earlier:
            vals.append(max(earlier) - matrix[t][j])
    return sum(vals) / len(vals) if vals else None


def maa(matrix: list[list[float | None]]) -> float | None:
    """Mean average accuracy: mean over steps i of the mean of A[i][j], j <= i."""
    rows = [[a for a in row[: i + 1] if a is not None] for i, row in enumerate(matrix)]
    means = [sum(r) / len(r) for r in rows if r]
    return sum(means) / len(means) if means else None
