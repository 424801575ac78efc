"""Any local LLaVA-style checkpoint is a base (Llama, Qwen2, Mistral); nothing is ever downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cmoe.config import BaseModelConfig
from cmoe.model.base import BaseModelError, describe, load_base, save_base, tiny_image_processor
from cmoe.model.inference import answer
from cmoe.model.processor import VLProcessor
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
