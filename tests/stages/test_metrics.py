"""Answer scoring (CoIN's rules after VQA normalisation) and the continual metrics of an accuracy matrix."""

from __future__ import annotations

import pytest

from cmoe.stages.metrics import avg_acc, bwt, forgetting, maa, normalize, score

# After task i (row), accuracy on task j (column); chosen so that every metric differs from the others.
MATRIX = [
    [80.0, None, None],
    [90.0, 70.0, None],
    [60.0, 85.0, 50.0],
]


def test_normalize_ignores_case_punctuation_articles_and_spacing() -> None:
    assert normalize("  The Red, CIRCLE! ") == "red circle"
    assert normalize("an apple") == normalize("Apple.") == "apple"
    assert normalize("theatre") == "theatre"  # an article only as a whole word
    assert normalize("a") == ""


def test_exact_match_accepts_any_listed_answer_after_normalisation() -> None:
    assert score("The Square.", ["circle", "square"], "exact_match") == 1.0
    assert score("squares", ["circle", "square"], "exact_match") == 0.0
    assert score("red square", ["square"], "exact_match") == 0.0


def test_contains_matches_a_substring_either_way_but_not_an_empty_answer() -> None:
    assert score("golden retriever dog", ["retriever"], "contains") == 1.0
    assert score("retriever", ["golden retriever"], "contains") == 1.0
    assert score("cat", ["retriever"], "contains") == 0.0
    assert score("", ["retriever"], "contains") == 0.0
    assert score("the.", ["retriever"], "contains") == 0.0  # normalises to empty


@pytest.mark.parametrize("agreeing, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 1.0)])
def test_vqa_soft_gives_a_third_per_agreeing_annotator_capped_at_one(agreeing: int, expected: float) -> None:
    answers = ["Two"] * agreeing + ["three"] * (10 - agreeing)
    assert score("two", answers, "vqa_soft") == pytest.approx(expected)


def test_unknown_metric_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("a", ["a"], "bleu")


def test_avg_is_the_mean_of_the_final_row() -> None:
    assert avg_acc(MATRIX) == pytest.approx((60 + 85 + 50) / 3)


def test_bwt_is_final_minus_just_learned_over_old_tasks() -> None:
    assert bwt(MATRIX) == pytest.approx(((60 - 80) + (85 - 70)) / 2)  # -2.5


def test_forgetting_is_best_earlier_minus_final_over_old_tasks() -> None:
    assert forgetting(MATRIX) == pytest.approx(((90 - 60) + (70 - 85)) / 2)  # 7.5


def test_maa_is_the_mean_over_steps_of_the_seen_tasks_mean() -> None:
    assert maa(MATRIX) == pytest.approx((80 + (90 + 70) / 2 + (60 + 85 + 50) / 3) / 3)  # 75


def test_after_one_task_nothing_can_have_been_forgotten() -> None:
    one = [[42.0]]
    assert (avg_acc(one), bwt(one), forgetting(one), maa(one)) == (42.0, 0.0, 0.0, 42.0)
