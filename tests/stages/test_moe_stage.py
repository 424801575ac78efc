"""The base's MoE stage: trained experts that differ, carried by the base folder and by every state built on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmoe.config import MoEConfig, tiny_test_config
from cmoe.data.synth import write_pretrain_corpus
from cmoe.model.base import load_base
from cmoe.model.cmoe_layer import add_expert, add_task, cmoe_layers
from cmoe.model.moe_base import MOE_FILE, MoEBaseError
from cmoe.model.routing import route
from cmoe.model.state import load_state, save_state
from cmoe.model.surgery import convert_to_cmoe
from cmoe.stages.pretrain import CARD, build_base

from .conftest import stage_config


def _converted(base: Path, **moe: object) -> torch.nn.Module:
    """The base at `base`, upcycled with tiny_test_config's MoE layout (`moe` overrides fields)."""
    model, _ = load_base(base)
    layout = MoEConfig(**{**tiny_test_config(base.parent).moe.model_dump(), **moe})
    return convert_to_cmoe(model, layout, base_path=str(base))


def _outputs(layer, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return torch.stack([expert(x) for expert in layer.experts])


def test_after_the_moe_stage_the_experts_differ(base_dir: Path) -> None:
    layers = cmoe_layers(_converted(base_dir))
    x = torch.randn(256, next(iter(layers.values())).hidden_size, generator=torch.Generator().manual_seed(0))
    for i, layer in layers.items():
        a, b = _outputs(layer, x)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
        assert cosine < 0.97, (i, float(cosine))  # copies would give exactly 1
    card = json.loads((base_dir / CARD).read_text())["moe_stage"]
    assert all(s["mean_pairwise"] < 0.97 for s in card["similarity"].values())
    assert all(sum(u) == pytest.approx(1.0, abs=1e-3) for u in card["utilisation"].values())


def test_the_upcycled_experts_are_the_trained_ones_and_new_routers_start_from_the_base_router(base_dir: Path) -> None:
    saved = load_file(base_dir / MOE_FILE)
    model = _converted(base_dir)
    add_task(model, "t")
    for i, layer in cmoe_layers(model).items():
        for e, expert in enumerate(layer.experts):
            for k, v in expert.state_dict().items():
                assert torch.equal(v, saved[f"layers.{i}.experts.{e}.{k}"])
        assert torch.equal(layer.routers[0], saved[f"layers.{i}.router"])


def test_a_state_on_the_moe_base_round_trips_bit_identically(base_dir: Path, tmp_path: Path) -> None:
    model = _converted(base_dir)
    add_task(model, "t")
    add_expert(model, 0, "copy", 1)
    state = save_state(model, tmp_path / "state")
    loaded = load_state(state)
    want = dict(model.named_parameters())
    got = dict(loaded.named_parameters())
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    ids[ids == model.config.image_token_id] = 5  # text only: no image placeholder
    with torch.no_grad(), route(model, ["t", "t"]), route(loaded, ["t", "t"]):
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_a_copied_state_carries_the_trained_experts(base_dir: Path, tmp_path: Path) -> None:
    model = _converted(base_dir)
    add_task(model, "t")
    state = save_state(model, tmp_path / "state", copy_base=True)
    assert (state / "base" / MOE_FILE).read_bytes() == (base_dir / MOE_FILE).read_bytes()
    experts = cmoe_layers(load_state(state))[0].experts
    assert not torch.equal(experts[0].down_proj.weight, experts[1].down_proj.weight)


def test_a_layout_other_than_the_bases_is_refused_naming_the_file(base_dir: Path) -> None:
    with pytest.raises(MoEBaseError, match=rf"{MOE_FILE}: the base was trained as MoE layers \[0, 1\] with 2 experts"):
        _converted(base_dir, initial_experts=3)


def test_moe_epochs_0_builds_a_dense_base_whose_experts_are_copies(tmp_path: Path) -> None:
    corpus = write_pretrain_corpus(tmp_path / "pretrain", n_train=16, n_test=4)
    cfg = tiny_test_config(tmp_path)
    cfg.base.moe_epochs = 0
    built = build_base(cfg.base, tmp_path / "base", corpus=corpus, cache_dir=tmp_path / "cache", moe=cfg.moe)
    assert built.moe_stage is None and not (tmp_path / "base" / MOE_FILE).exists()
    layer = cmoe_layers(_converted(tmp_path / "base"))[0]
    assert torch.equal(layer.experts[0].down_proj.weight, layer.experts[1].down_proj.weight)


def test_the_lineage_opens_on_the_moe_base(base_dir: Path, tmp_path: Path) -> None:
    from cmoe.stages.common import open_lineage

    model, _ = open_lineage(stage_config(tmp_path / "home", base_dir), None)
    assert all(layer.base_router is not None for layer in cmoe_layers(model).values())
