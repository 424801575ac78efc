"""Answer (image, question) rows with a saved CMoE state: what `cmoe predict` and the pyfunc serve.

No task label is needed: the locator (PTL) picks every row's router, and each answer comes with
the located task and the locator's confidence (its probability for that task), so a serving
system can alert on, or send to a person, the rows the locator is unsure about.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from cmoe.config import CmoeConfig
from cmoe.model.cmoe_layer import cmoe_info
from cmoe.model.inference import device_of
from cmoe.model.routing import routing
from cmoe.stages.common import open_lineage

MAX_NEW_TOKENS = 8
BATCH_SIZE = 64


@lru_cache(maxsize=4)
def _load(state_dir: str) -> tuple[torch.nn.Module, object]:
    """Load a state once per process: a serving pyfunc calls predict for every request."""
    return open_lineage(CmoeConfig(), Path(state_dir))


@torch.no_grad()
def predict_rows(state_dir: str | Path, images: list[Image.Image], questions: list[str]) -> list[dict]:
    """One {answer, task, confidence} per row; task/confidence are None for a single-router model."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: one of each per row")
    model, processor = _load(str(Path(state_dir).resolve()))
    single = cmoe_info(model).single_router
    rows: list[dict] = []
    for i in range(0, len(questions), BATCH_SIZE):
        enc = [processor.encode(im.convert("RGB"), q) for im, q in zip(images[i:i + BATCH_SIZE], questions[i:i + BATCH_SIZE])]
        b = processor.collate(enc, left_pad=True, device=device_of(model))
        with routing(model, "single" if single else "locator", input_ids=b["input_ids"],
                     pixel_values=b["pixel_values"], attention_mask=b["attention_mask"]) as located:
            gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 pixel_values=b["pixel_values"], max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=processor.pad_id, eos_token_id=processor.eos_id)
        answers = processor.decode_answers(gen[:, b["input_ids"].shape[1]:])
        for j, ans in enumerate(answers):
            if located is None:
                rows.append({"answer": ans, "task": None, "confidence": None})
            else:
                rows.append({"answer": ans, "task": located.names[j],
                             "confidence": float(located.probs[j].max())})
    return rows
