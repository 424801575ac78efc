"""Base pretraining + MoE stage are deterministic for a seed, cached by their recipe, and change with it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cmoe.config import MoEConfig, tiny_test_config
from cmoe.data.synth import write_pretrain_corpus
from cmoe.model.base import weights_sha256
from cmoe.stages.pretrain import build_base

MOE = tiny_test_config(".").moe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small captioning corpus: these tests are about reproducibility, not quality."""
    return write_pretrain_corpus(tmp_path_factory.mktemp("corpus") / "pretrain", n_train=32, n_test=4)


def _build(cfg, out: Path, corpus: Path, moe: MoEConfig = MOE):  # noqa: ANN001, ANN202
    return build_base(cfg, out, corpus=corpus, cache_dir=out.parent / "cache", moe=moe)


def test_same_seed_builds_identical_weights_and_a_second_call_reuses_them(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_test_config(tmp_path).base
    first = _build(cfg, tmp_path / "a", corpus)
    # whatever ran before in the process must not matter
    torch.manual_seed(123)
    random.seed(5)
    second = _build(cfg, tmp_path / "b", corpus)
    assert not first.reused and not second.reused
    # the hash covers every safetensors file of the folder: the dense checkpoint and the MoE stage's experts
    assert first.weights_sha256 == second.weights_sha256 == weights_sha256(tmp_path / "b")

    again = _build(cfg, tmp_path / "b", corpus)
    assert again.reused and again.train is None
    assert again.weights_sha256 == second.weights_sha256 == weights_sha256(tmp_path / "b")
    assert again.moe_stage == second.moe_stage and again.styleshift == second.styleshift
    # the card says where the build's time went, phase by phase
    assert set(second.phases_s) == {"corpus", "tokenizer", "pretrain", "evaluation", "moe_stage", "moe_evaluation"}
    assert again.phases_s == second.phases_s


def test_a_different_seed_builds_different_weights(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_test_config(tmp_path).base
    seed0 = _build(cfg, tmp_path / "seed0", corpus)
    seed1 = _build(cfg.model_copy(update={"seed": 1}), tmp_path / "seed1", corpus)
    assert not seed1.reused
    assert seed0.recipe_sha256 != seed1.recipe_sha256
    assert seed0.weights_sha256 != seed1.weights_sha256


def test_another_moe_layout_is_another_recipe(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_test_config(tmp_path).base
    two = _build(cfg, tmp_path / "base", corpus)
    three = _build(cfg, tmp_path / "base", corpus, MOE.model_copy(update={"initial_experts": 3}))
    assert not three.reused and three.recipe_sha256 != two.recipe_sha256
    assert len(three.moe_stage["utilisation"]["0"]) == 3
    # a setting of the continual stages only (the growth cap) keeps the built base
    capped = _build(cfg, tmp_path / "base", corpus, MOE.model_copy(update={"initial_experts": 3, "max_experts_per_layer": 6}))
    assert capped.reused and capped.recipe_sha256 == three.recipe_sha256


def test_cli_base_build_reports_the_moe_stage_and_the_style_shift(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from cmoe.cli import app

    cfg = tiny_test_config(tmp_path / "home")
    cfg.base.pretrain_samples = 16
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["base", "build", "--config", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "MoE stage: experts' mean pairwise output similarity 0." in result.output
    assert "style-shifted suite (250): base " in result.output and "text-only prior" in result.output
