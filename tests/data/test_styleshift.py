"""The style-shifted suite: deterministic for a seed, balanced over attributes, in the base's own note format."""

from __future__ import annotations

from pathlib import Path

from cmoe.data.bundle import bundle_sha256
from cmoe.data.styleshift import ATTRIBUTES, styleshift_split, write_styleshift_suite
from cmoe.data.synth import COLORS, COUNT_WORDS, LETTERS, REGIONS, SHAPES, caption_attributes
from cmoe.data.validate import validate_bundle

VALUES = {"color": set(COLORS), "shape": set(SHAPES), "position": set(REGIONS), "count": set(COUNT_WORDS),
          "letter": {x.lower() for x in LETTERS}}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_ones(tmp_path: Path) -> None:
    a = write_styleshift_suite(tmp_path / "a", seed=0, n_train=5, n_test=10)
    b = write_styleshift_suite(tmp_path / "b", seed=0, n_train=5, n_test=10)
    c = write_styleshift_suite(tmp_path / "c", seed=1, n_train=5, n_test=10)
    assert bundle_sha256(a) == bundle_sha256(b) != bundle_sha256(c)
    assert validate_bundle(a).ok


def test_every_attribute_is_asked_equally_in_the_pretraining_note_format() -> None:
    records = styleshift_split(0, "test", 10 * len(ATTRIBUTES))
    asked = [r.question for r in records]
    assert {q: asked.count(q) for q in set(asked)} == {f"Describe the {a}.": 10 for a in ATTRIBUTES}
    for r in records:
        attribute = r.question.removeprefix("Describe the ").removesuffix(".")
        assert r.answer.startswith(f"{attribute}: ") and r.answer.endswith(".")
        assert caption_attributes(r.answer) == [r.answer[len(attribute) + 2:-1]]  # one known value
        assert r.answer[len(attribute) + 2:-1] in VALUES[attribute]
        assert r.image.size == (64, 64) and r.image.mode == "RGB"
