"""Base pretraining is deterministic for a seed, cached by its recipe, and changes with the seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.config import tiny_test_config
from cmoe.data.synth import write_pretrain_corpus
from cmoe.model.base import weights_sha256
from cmoe.stages.pretrain import build_base


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small captioning corpus: these tests are about reproducibility, not quality."""
    return write_pretrain_corpus(tmp_path_factory.mktemp("corpus") / "pretrain", n_train=32, n_test=4)


def test_same_seed_builds_identical_weights_and_a_second_call_reuses_them(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_test_config(tmp_path).base
    first = build_base(cfg, tmp_path / "a", corpus=corpus, cache_dir=tmp_path / "cache")
    second = build_base(cfg, tmp_path / "b", corpus=corpus, cache_dir=tmp_path / "cache")
    assert not first.reused and not second.reused
    assert first.weights_sha256 == second.weights_sha256 == weights_sha256(tmp_path / "b")

    again = build_base(cfg, tmp_path / "b", corpus=corpus, cache_dir=tmp_path / "cache")
    assert again.reused and again.train is None
    assert again.weights_sha256 == second.weights_sha256 == weights_sha256(tmp_path / "b")


def test_a_different_seed_builds_different_weights(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_test_config(tmp_path).base
    seed0 = build_base(cfg, tmp_path / "seed0", corpus=corpus, cache_dir=tmp_path / "cache")
    seed1 = build_base(cfg.model_copy(update={"seed": 1}), tmp_path / "seed1", corpus=corpus, cache_dir=tmp_path / "cache")
    assert not seed1.reused
    assert seed0.recipe_sha256 != seed1.recipe_sha256
    assert seed0.weights_sha256 != seed1.weights_sha256
