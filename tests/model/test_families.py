"""Every supported vision-language family is a base: loaded, prompted, upcycled, taught a task and asked.

Each class gets a tiny random checkpoint written with `save_pretrained` (32-wide, 2 decoder layers,
1-layer vision tower, the session base's trained tokenizer and a one-turn chat template), and a
first task learned on it through the stages the flow runs: probe -> expand -> evaluate -> predict.
These check that the path runs and the state loads, not accuracy. A checkpoint cmoe cannot use is
refused at `cmoe base info` in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from PIL import Image
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.config import tiny_test_config
from cmoe.model.base import BaseModelError, load_base
from cmoe.model.processor import IGNORE

# One user turn, the image first: how the families' own templates lay a single-image question out.
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE\n"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # LLaVA-NeXT / OneVision: one view, or two side by side
CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 16}


def _text(tok: tf.PreTrainedTokenizerBase, **extra: object) -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tok), "max_position_embeddings": 256,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "tie_word_embeddings": False, **extra}


def _qwen_text(tok: tf.PreTrainedTokenizerBase) -> dict:
    return _text(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def _idefics(config_cls: type, tok: tf.PreTrainedTokenizerBase, image_id: int) -> tf.PretrainedConfig:
    vision = {**CLIP, "patch_size": 8}  # 16 patches, pixel-shuffled by 2: 4 tokens per crop
    return config_cls(vision_config=vision, text_config=tf.LlamaConfig(**_text(tok)).to_dict(), scale_factor=2,
                      image_token_id=image_id)


def _qwen_vision(v25: bool) -> dict:
    common = {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 8, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    if v25:
        return {**common, "intermediate_size": 64, "out_hidden_size": 32, "fullatt_block_indexes": [0],
                "window_size": 16}
    return {**common, "embed_dim": 32, "mlp_ratio": 2}


# class -> (config from (tokenizer, image token id), its image processor)
QWEN_PIXELS = {"min_pixels": 16 * 16, "max_pixels": 32 * 32, "patch_size": 8, "merge_size": 2, "temporal_patch_size": 2}
CLASSES = {
    "LlavaNextForConditionalGeneration": (
        lambda tok, img: tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**CLIP), image_token_id=img,
                                            text_config=tf.LlamaConfig(**_text(tok)), image_grid_pinpoints=PINPOINTS),
        lambda: tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=PINPOINTS)),
    "LlavaOnevisionForConditionalGeneration": (
        lambda tok, img: tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**CLIP), image_token_id=img,
                                                 text_config=tf.Qwen2Config(**_text(tok)),
                                                 image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1),
        lambda: tf.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)),
    "Qwen2VLForConditionalGeneration": (
        lambda tok, img: tf.Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=_qwen_vision(False),
                                          image_token_id=img, video_token_id=tok.pad_token_id),
        lambda: tf.Qwen2VLImageProcessorPil(**QWEN_PIXELS)),
    "Qwen2_5_VLForConditionalGeneration": (
        lambda tok, img: tf.Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=_qwen_vision(True),
                                             image_token_id=img, video_token_id=tok.pad_token_id),
        lambda: tf.Qwen2VLImageProcessorPil(**QWEN_PIXELS)),
    "Idefics3ForConditionalGeneration": (  # split into 32 px crops + the global view
        lambda tok, img: _idefics(tf.Idefics3Config, tok, img),
        lambda: tf.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})),
    "SmolVLMForConditionalGeneration": (  # one view
        lambda tok, img: _idefics(tf.SmolVLMConfig, tok, img),
        lambda: tf.SmolVLMImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                            do_image_splitting=False)),
}


def write_checkpoint(cls: str, tokenizer_dir: Path, out: Path, **config: object) -> Path:
    """A tiny random checkpoint of `cls`: weights, the tokenizer of `tokenizer_dir`, image processor, chat template."""
    make_config, make_processor = CLASSES[cls]
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = make_config(tok, image_id)
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    getattr(tf, cls)(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    make_processor().save_pretrained(out)
    (out / "chat_template.jinja").write_text(TEMPLATE.replace("IMAGE", "<image>"))
    return out


@pytest.fixture(scope="module", params=sorted(CLASSES))
def checkpoint(request: pytest.FixtureRequest, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(request.param, tiny_base, tmp_path_factory.mktemp(request.param))


def test_the_image_placeholder_expands_as_the_family_reads_it_at_any_aspect(checkpoint: Path) -> None:
    model, processor = load_base(checkpoint)
    # wide, tall and square: LLaVA-NeXT pads to a pinpoint, Qwen2-VL's grid follows the image, Idefics3 crops
    encoded = [processor.encode(Image.new("RGB", size, "red"), "what color is the shape?", "red")
               for size in ((96, 48), (48, 96), (64, 64))]
    batch = processor.collate(encoded)
    with torch.no_grad():
        out = model(**batch)  # every family refuses image tokens that do not match its image features
    assert torch.isfinite(out.loss)
    answer = batch["labels"][0][batch["labels"][0] != IGNORE]
    assert answer[-1] == processor.eos_id  # the answer, then end of sequence, is all that is supervised


def test_a_task_is_learned_and_answered_on_each_family(checkpoint: Path, tiny_suite: list[Path],
                                                       tmp_path: Path) -> None:
    from cmoe.data.evalsets import keep_eval_set
    from cmoe.data.validate import open_bundle
    from cmoe.model.cmoe_layer import cmoe_info
    from cmoe.model.state import load_state
    from cmoe.stages.evaluate import run_evaluate
    from cmoe.stages.expand import run_expand
    from cmoe.stages.predict import predict_rows, prompt_problem
    from cmoe.stages.probe import run_probe

    cfg = tiny_test_config(tmp_path / "home")
    cfg.base.path = str(checkpoint)
    bundle = open_bundle(tiny_suite[0], cache_dir=cfg.home / "cache")
    probe = run_probe(cfg, bundle, None, tmp_path / "probe")
    kept = keep_eval_set(bundle, str(tmp_path / "evalsets"), cache_dir=cfg.home / "cache")
    expanded = run_expand(cfg, bundle, None, probe, tmp_path / "expand", eval_set=kept, copy_base=False)
    report = run_evaluate(cfg, Path(expanded.state_dir), tmp_path / "eval", [])
    assert report.tasks == [bundle.name] and report.locator_acc == 100.0  # one task: the locator has one choice
    pngs = sorted((tiny_suite[0] / "test").rglob("*.png"))[:2]
    rows = predict_rows(cfg, expanded.state_dir, [Image.open(p) for p in pngs], ["what color is the shape?"] * 2)
    assert [r["task"] for r in rows] == [bundle.name] * 2 and all(isinstance(r["answer"], str) for r in rows)
    assert prompt_problem(cfg, expanded.state_dir, pngs[0].read_bytes(), "what color is the shape?") is None
    assert "too long" in prompt_problem(cfg, expanded.state_dir, pngs[0].read_bytes(), "what color? " * 200)
    state = load_state(expanded.state_dir)  # the state loads back onto the family's own class, task and all
    assert type(state).__name__ == json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    assert cmoe_info(state).tasks == [bundle.name] and cmoe_info(state).locator.tasks == [bundle.name]


def _info(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["base", "info", str(path)])
    return result.exit_code, result.stderr


def test_base_info_refuses_an_unsupported_family_naming_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    code, err = _info(tmp_path)
    assert code == 1 and len(err.splitlines()) == 1
    assert "model_type is 'blip-2'" in err and "llava_next" in err and "qwen2_vl" in err and "idefics3" in err


def test_base_info_refuses_a_decoder_without_gated_mlps(tiny_base: Path, tmp_path: Path) -> None:
    # Phi's MLP is fc1 -> activation -> fc2: nothing for CMoE to upcycle
    ckpt = write_checkpoint("LlavaNextForConditionalGeneration", tiny_base, tmp_path / "phi",
                            text_config=tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, vocab_size=600))
    code, err = _info(ckpt)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "decoder layer 0: PhiMLP is not a gated MLP (missing ['gate_proj', 'up_proj', 'down_proj', 'act_fn'])" in err


def test_a_chat_family_without_a_chat_template_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    ckpt = write_checkpoint("Qwen2VLForConditionalGeneration", tiny_base, tmp_path / "qwen")
    (ckpt / "chat_template.jinja").unlink()
    with pytest.raises(BaseModelError, match="no chat template.*Qwen2-VL"):
        load_base(ckpt)
