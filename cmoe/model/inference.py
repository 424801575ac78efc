"""Batched greedy answering with the KV cache: the one decoding path of evaluation and predict."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import PreTrainedModel

from cmoe.model.processor import VLProcessor


def default_device() -> torch.device:
    """Where a freshly loaded model runs: the GPU when one is visible (as training does), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights: batches must be collated onto it (after training, a GPU)."""
    return next(model.parameters()).device


@torch.no_grad()
def answer(
    model: PreTrainedModel,
    processor: VLProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy-decode an answer for every (image, question); prompts are left-padded per batch."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        enc = [processor.encode(im, q) for im, q in zip(images[i:i + batch_size], questions[i:i + batch_size])]
        b = processor.collate(enc, left_pad=True, device=device_of(model))
        gen = model.generate(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_id,
            eos_token_id=processor.eos_id,
        )
        out += processor.decode_answers(gen[:, b["input_ids"].shape[1]:])
    model.train(was_training)
    return out
