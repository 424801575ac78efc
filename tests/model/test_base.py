"""Any local LLaVA-style checkpoint is a base (Llama, Qwen2, Mistral); nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmoe.config import BaseModelConfig, MoEConfig
from cmoe.model.base import BaseModelError, describe, load_base, load_model, save_base, tiny_image_processor
from cmoe.model.cmoe_layer import add_task, attach_probes, aux_loss, trainable_parameters
from cmoe.model.inference import answer
from cmoe.model.processor import VLProcessor
from cmoe.model.routing import route
from cmoe.model.surgery import convert_to_cmoe
from cmoe.model.tokenizer import IMAGE, train_tokenizer
from tests.model.helpers import tiny_llava


def write_checkpoint(text: str, out: Path) -> Path:
    """A tiny random LLaVA with `text` backbone, saved with a local tokenizer and image processor."""
    tok = train_tokenizer(["what color is the shape?", "a red circle."], vocab_size=300)
    model = tiny_llava(text)
    model.config.image_token_id = tok.convert_tokens_to_ids(IMAGE)
    model.resize_token_embeddings(len(tok))
    processor = VLProcessor(tok, tiny_image_processor(BaseModelConfig(image_size=32)), model.config)
    save_base(model, processor, out)
    return out


@pytest.mark.parametrize("text", ["llama", "qwen2", "mistral"])
def test_a_local_llava_checkpoint_loads_frozen_and_answers(text: str, tmp_path: Path) -> None:
    model, processor = load_base(write_checkpoint(text, tmp_path / text))
    assert describe(model)["text_type"] == text
    assert not any(p.requires_grad for p in model.parameters())
    out = answer(model, processor, [Image.new("RGB", (32, 32), "red")], ["what color is the shape?"], max_new_tokens=2)
    assert len(out) == 1 and isinstance(out[0], str)


def test_a_hub_id_fails_at_once_with_the_reason() -> None:
    with pytest.raises(BaseModelError, match="never downloads"):
        load_base("llava-hf/llava-1.5-7b-hf")


def test_a_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    ckpt = write_checkpoint("llama", tmp_path / "ckpt")
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    torch.save({}, ckpt / "pytorch_model.bin")  # a pickle cmoe must never load
    with pytest.raises(BaseModelError, match="safetensors"):
        load_base(ckpt)


def _padded_batch(processor: VLProcessor) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths (one padded) with answers."""
    return processor.collate([processor.encode(Image.new("RGB", (32, 32), "red"), "what colour?", "red"),
                              processor.encode(Image.new("RGB", (32, 32), "blue"), "how many shapes are there?", "one")])


def test_sdpa_and_eager_attention_give_the_same_logits(tiny_base: Path) -> None:
    model, processor = load_base(tiny_base, attn_implementation="sdpa")
    batch = _padded_batch(processor)
    eager = load_model(tiny_base, attn_implementation="eager")
    assert (model.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    with torch.no_grad():
        logits = [m(**batch).logits[batch["attention_mask"].bool()] for m in (model, eager)]  # padding aside
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
                    reason="flash-attn and a GPU are here: flash_attention_2 can load")
def test_flash_attention_where_it_cannot_run_is_one_clear_error(tiny_base: Path) -> None:
    with pytest.raises(BaseModelError, match=r"^base\.attn_implementation: flash_attention_2 needs the flash-attn "
                                             r"package|^base\.attn_implementation: flash_attention_2 needs a CUDA GPU"):
        load_model(tiny_base, "bfloat16", "flash_attention_2")


def test_a_bf16_base_loads_frozen_in_bf16_and_what_trains_stays_fp32(tiny_base: Path) -> None:
    model, processor = load_base(tiny_base, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    convert_to_cmoe(model, MoEConfig(initial_experts=2, top_k=1))
    add_task(model, "t")
    attach_probes(model, source=0)  # a probe expert per layer and the task's router: fp32 copies
    trainable = trainable_parameters(model)
    assert {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    model.train()
    with route(model, ["t"]):  # on the CPU, without autocast: each expert computes in its own dtype
        (model(**_padded_batch(processor)).loss + aux_loss(model)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in trainable)
