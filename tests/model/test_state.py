"""The state directory: save -> load reproduces the model exactly; anything inconsistent is refused."""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from cmoe.config import LocatorConfig, MoEConfig
from cmoe.model.cmoe_layer import add_expert, add_task, attach_probes, cmoe_info, cmoe_layers
from cmoe.model.locator import fit_task_vae, locator_features
from cmoe.model.routing import route
from cmoe.model.base import weights_sha256
from cmoe.model.state import StateError, load_state, save_state
from cmoe.model.surgery import convert_to_cmoe

from .helpers import add_distinct_task, make_batch, tiny_llava


def _two_task_model(base_dir: Path) -> LlavaForConditionalGeneration:
    """Base saved to `base_dir`; tasks a (one extra expert in layer 2) and b (one per layer) + VAEs."""
    tiny_llava().save_pretrained(base_dir)
    model = convert_to_cmoe(LlavaForConditionalGeneration.from_pretrained(base_dir).eval(), MoEConfig(layers="every_other"),
                            base_path=str(base_dir))
    add_task(model, "a")
    add_expert(model, 2, "random")
    add_distinct_task(model, "b")
    cfg = LocatorConfig(epochs=2, hidden=8, latent_dim=2)
    for seed, task in enumerate(["a", "b"]):
        model.cmoe.locator.add_task(task, fit_task_vae(locator_features(model, **make_batch(8, seed=seed)), cfg))
    return model


def _logits(model, task: str) -> torch.Tensor:  # noqa: ANN001
    with route(model, [task] * 2), torch.no_grad():
        return model(**make_batch(seed=9)).logits


@pytest.fixture
def saved(tmp_path: Path) -> tuple[LlavaForConditionalGeneration, Path]:
    model = _two_task_model(tmp_path / "base")
    return model, save_state(model, tmp_path / "state")


def test_round_trip_is_exact(saved) -> None:  # noqa: ANN001
    model, state = saved
    manifest = json.loads((state / "cmoe.json").read_text())
    assert manifest["tasks"] == ["a", "b"] and manifest["experts"]["2"] == ["base"] * 4 + ["a", "b"]
    assert not (state / "base").exists() and sorted(p.name for p in (state / "tasks" / "b").iterdir()) == [
        "experts.safetensors", "locator.safetensors", "router.safetensors"]
    loaded = load_state(state, LlavaForConditionalGeneration.from_pretrained)
    for task in ("a", "b"):
        assert torch.equal(_logits(loaded, task), _logits(model, task))
    assert loaded.cmoe.tasks == ["a", "b"] and cmoe_layers(loaded)[2].expert_origin == ["base"] * 4 + ["a", "b"]
    feats = torch.randn(5, 64)
    assert torch.equal(loaded.cmoe.locator.errors(feats), model.cmoe.locator.errors(feats))


def test_copied_base_travels_alone_and_resaves(saved, tmp_path: Path) -> None:  # noqa: ANN001
    model, _ = saved
    state = save_state(model, tmp_path / "alone", copy_base=True)
    assert json.loads((state / "cmoe.json").read_text())["base"]["path"] == "base"
    (tmp_path / "moved").mkdir()
    moved = state.rename(tmp_path / "moved" / "state")
    loaded = load_state(moved)  # default loader: the local LLaVA checkpoint under base/
    assert torch.equal(_logits(loaded, "b"), _logits(model, "b"))
    add_task(loaded, "c")  # a loaded state continues learning and saves again (atomically, in place)
    save_state(loaded, moved, overwrite=True)
    assert load_state(moved).cmoe.tasks == ["a", "b", "c"]


def test_in_memory_base_is_rebuilt_for_copy_base(tmp_path: Path) -> None:
    model = convert_to_cmoe(tiny_llava(), MoEConfig(layers="every_other"))
    add_task(model, "a")
    with pytest.raises(StateError, match="no path"):
        save_state(model, tmp_path / "s")
    loaded = load_state(save_state(model, tmp_path / "s", copy_base=True))
    assert torch.equal(_logits(loaded, "a"), _logits(model, "a"))


def test_single_router_round_trip(tmp_path: Path) -> None:
    model = convert_to_cmoe(tiny_llava(), MoEConfig(layers="every_other"), single_router=True)
    for task in ("a", "b"):
        add_task(model, task)
        add_expert(model, 0, "random")
        with torch.no_grad():
            cmoe_layers(model)[0].routers[0].normal_()
    loaded = load_state(save_state(model, tmp_path / "s", copy_base=True))
    assert torch.equal(_logits(loaded, "b"), _logits(model, "b"))


def _corrupt_byte(state: Path) -> None:
    f = state / "tasks" / "b" / "experts.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))


def _wrong_shape(state: Path) -> None:
    """A well-formed delta with a wrong-shaped router whose manifest hash was updated to match."""
    f = state / "tasks" / "a" / "router.safetensors"
    save_file({"layers.0.router": torch.zeros(4, 32), "layers.2.router": torch.zeros(3, 32)}, f)
    manifest = json.loads((state / "cmoe.json").read_text())
    manifest["deltas"]["a"]["router"]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (state / "cmoe.json").write_text(json.dumps(manifest))


def _edit_manifest(key: str, value: object) -> Callable[[Path], None]:
    def edit(state: Path) -> None:
        manifest = json.loads((state / "cmoe.json").read_text())
        manifest[key] = value
        (state / "cmoe.json").write_text(json.dumps(manifest))
    return edit


def _modified_base(state: Path) -> None:
    base = Path(json.loads((state / "cmoe.json").read_text())["base"]["path"])
    model = LlavaForConditionalGeneration.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    model.save_pretrained(base)


def _base_file(name: str, edit: Callable[[str], str]) -> Callable[[Path], None]:
    """Damage: one config or tokenizer file of the referenced base rewritten by `edit` (created when absent)."""
    def damage(state: Path) -> None:
        f = Path(json.loads((state / "cmoe.json").read_text())["base"]["path"]) / name
        f.write_text(edit(f.read_text() if f.is_file() else ""))
    return damage


@pytest.mark.parametrize("damage, message", [
    (_corrupt_byte, r"tasks/b/experts.safetensors: sha256 \w+ does not match"),
    (_wrong_shape, r"tasks/a/router.safetensors: tensor layers.2.router is \{'shape': \[3, 32\]"),
    (_edit_manifest("format_version", 2), r"cmoe.json: format_version 2 is unknown; this cmoe reads 1"),
    (_modified_base, r"base sha256 \w+ differs from the manifest's \w+ \(over its weights\+config\+tokenizer"),
    (_base_file("config.json", lambda t: t.replace('"vocab_size"', '"pad_token_id": 0, "vocab_size"', 1)),
     r"base sha256 \w+ differs from the manifest's"),
    (_base_file("tokenizer.json", lambda t: t + "{}"), r"base sha256 \w+ differs from the manifest's"),
    (_edit_manifest("deltas", {}), r"cmoe.json: task 'a' needs experts and router deltas"),
    (lambda s: (s / "tasks" / "a" / "locator.safetensors").unlink(), r"tasks/a/locator.safetensors: delta file missing"),
])
def test_damaged_state_is_refused_clearly(saved, damage, message: str) -> None:  # noqa: ANN001
    _, state = saved
    damage(state)
    with pytest.raises(StateError, match=message):
        load_state(state, LlavaForConditionalGeneration.from_pretrained)


def test_save_is_atomic_and_refuses_probes(saved, tmp_path: Path) -> None:  # noqa: ANN001
    model, state = saved
    with pytest.raises(StateError, match="already exists"):
        save_state(model, state)
    attach_probes(model, source=0)
    with pytest.raises(StateError, match="probes are attached"):
        save_state(model, tmp_path / "probed")
    assert not (tmp_path / "probed").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert cmoe_info(model).tasks == ["a", "b"]


def test_a_state_that_recorded_the_weights_alone_still_loads_and_resaves(saved, tmp_path: Path) -> None:  # noqa: ANN001
    """States written before the base hash covered config and tokenizer are checked as they were written."""
    model, state = saved
    manifest = json.loads((state / "cmoe.json").read_text())
    base = Path(manifest["base"]["path"])
    assert manifest["base"]["sha256"] == weights_sha256(base) != weights_sha256(base, weights_only=True)
    del manifest["base"]["sha256_of"]
    manifest["base"]["sha256"] = weights_sha256(base, weights_only=True)
    (state / "cmoe.json").write_text(json.dumps(manifest))
    loaded = load_state(state, LlavaForConditionalGeneration.from_pretrained)
    assert torch.equal(_logits(loaded, "a"), _logits(model, "a"))
    resaved = json.loads((save_state(loaded, tmp_path / "resaved") / "cmoe.json").read_text())
    assert resaved["base"]["sha256_of"] == "weights+config+tokenizer" and resaved["base"]["sha256"] == weights_sha256(base)
