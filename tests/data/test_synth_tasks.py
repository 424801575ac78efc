"""coin-mini's tasks: a known-skill and a new-skill task last, answers the pretraining corpus can say."""

from __future__ import annotations

import random

from cmoe.data.synth import COIN_MINI, COUNT_WORDS, _pretrain_records, _task_records, color_count_scene


def test_the_known_and_the_new_skill_task_come_after_the_first_five() -> None:
    assert [t.name for t in COIN_MINI] == ["shape-name", "color-name", "count-shapes", "read-letter", "locate-shape",
                                           "hue-name", "count-color"]
    hue, color = COIN_MINI[5], COIN_MINI[1]
    assert hue.scene is color.scene and not set(hue.questions) & set(color.questions)


def test_count_color_counts_only_the_asked_colour_and_names_it_in_the_question() -> None:
    rng = random.Random(0)
    task = COIN_MINI[6]
    for _ in range(50):
        scene = color_count_scene(rng)
        n = sum(c == scene.target for c, _ in scene.shapes)
        assert 1 <= n <= len(COUNT_WORDS) and task.answer(scene) == COUNT_WORDS[n - 1]
    for record in _task_records(task, random.Random(1), 20):
        assert "{" not in record.question and any(c in record.question for c in ("red", "green", "blue", "yellow"))


def test_the_pretraining_corpus_says_every_answer_word_of_every_task() -> None:
    corpus_words = {w for r in _pretrain_records(random.Random(0), 400) for w in r.answer.rstrip(".").replace(":", "").split()}
    for task in COIN_MINI:
        answers = {w for r in _task_records(task, random.Random(0), 100) for w in r.answer.split()}
        assert answers <= corpus_words, (task.name, answers - corpus_words)


def _pixels(records: list) -> list[bytes]:
    return [r.image.tobytes() for r in records]


def test_the_varied_share_draws_that_share_of_the_corpus_with_the_randomised_renderer() -> None:
    plain = _pretrain_records(random.Random(0), 200)
    assert _pixels(_pretrain_records(random.Random(0), 200, 0.0)) == _pixels(plain)  # share 0: coin-mini's own
    varied = _pretrain_records(random.Random(0), 200, 1.0)
    assert _pixels(_pretrain_records(random.Random(0), 200, 1.0)) == _pixels(varied)  # deterministic for a seed
    assert not set(_pixels(varied)) & set(_pixels(plain))
    assert all(r.image.size == plain[0].image.size and r.image.mode == "RGB" for r in varied)


def test_varied_scenes_are_captioned_with_the_attributes_they_show() -> None:
    from cmoe.data.synth import attribute_notes
    from cmoe.data.varied import varied_scene

    rng = random.Random(3)
    for kind, attributes in (("plain", {"color", "shape"}), ("multi", {"count"}), ("card", {"letter"}),
                             ("grid", {"color", "shape", "position"})):
        for _ in range(10):
            scene = varied_scene(rng, kind)
            assert set(attribute_notes(scene)) == attributes and scene.image.size == (64, 64)
