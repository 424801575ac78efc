"""Batched greedy answering with the KV cache: the one decoding path of evaluation, predict and pretraining."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedModel

from cmoe.model.processor import Encoded, VLProcessor
from cmoe.model.routing import RoutingMode, routing


def default_device() -> torch.device:
    """Where a freshly loaded model runs: the GPU when one is visible (as training does), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights: batches must be collated onto it (after training, a GPU)."""
    return next(model.parameters()).device


@dataclass(frozen=True)
class Decoded:
    """Greedy answers in input order; under locator routing also each sample's located task."""

    answers: list[str]
    located: list[str] | None  # the task whose router answered (locator routing only)
    confidence: list[float] | None  # the locator's probability for that task (locator routing only)
    margin: list[float] | None  # how far that probability leads the second-best task's (locator routing only)


@torch.no_grad()
def decode(
    model: PreTrainedModel, processor: VLProcessor, encoded: Sequence[Encoded], *, mode: RoutingMode | None = None,
    task: str | None = None, batch_size: int = 64, max_new_tokens: int = 8,
) -> Decoded:
    """Greedy-decode every encoded prompt, left-padded per batch, routed by `mode` (None: a plain model).

    `task` is the router of every sample under oracle routing; the model is in eval mode while decoding.
    """
    was_training = model.training
    model.eval()
    answers: list[str] = []
    located: list[str] | None = [] if mode == "locator" else None
    confidence: list[float] | None = [] if mode == "locator" else None
    margin: list[float] | None = [] if mode == "locator" else None
    for i in range(0, len(encoded), batch_size):
        b = processor.collate(list(encoded[i:i + batch_size]), left_pad=True, device=device_of(model))
        del b["labels"]  # the rest is the model's input: ids, mask and the family's image inputs
        tasks = [task] * len(b["input_ids"]) if mode == "oracle" else None
        routed = nullcontext() if mode is None else routing(model, mode, tasks, **b)
        with routed as pred:
            gen = model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_id,
                                 eos_token_id=processor.eos_id)
        answers += processor.decode_answers(gen[:, b["input_ids"].shape[1]:])
        if pred is not None:
            located += pred.names
            confidence += pred.probs.max(dim=-1).values.tolist()
            margin += pred.margin.tolist()
    model.train(was_training)
    return Decoded(answers, located, confidence, margin)


def answer(
    model: PreTrainedModel,
    processor: VLProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers of a plain (not CMoE-converted) model for every (image, question)."""
    encoded = [processor.encode(im, q) for im, q in zip(images, questions)]
    return decode(model, processor, encoded, batch_size=batch_size, max_new_tokens=max_new_tokens).answers
