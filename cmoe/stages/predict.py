"""Answer (image, question) rows with a saved CMoE state: what `cmoe predict` and the pyfunc serve.

No task label is needed: the locator (PTL) picks every row's router, and each answer comes with
the located task, the locator's confidence (its probability for that task) and its margin (how far
that probability leads the second-best task's), so a serving system can alert on, or send to a
person, the rows the locator is unsure about (`cmoe predict` flags a margin below
`gate.min_locator_margin`). Decoding follows
the config's `eval` section (batch size, answer length), as evaluation does. A row whose prompt and
answer would not fit the model's positions is refused (PromptTooLongError) before anything is decoded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cmoe.config import CmoeConfig
from cmoe.model.cmoe_layer import cmoe_info
from cmoe.model.inference import decode
from cmoe.model.processor import VLProcessor
from cmoe.stages.common import open_lineage


class PromptTooLongError(ValueError):
    """Rows whose prompt and answer exceed the model's positions (row index -> why): none is answered."""

    def __init__(self, rows: dict[int, str]) -> None:
        super().__init__("; ".join(f"row {i}: {why}" for i, why in rows.items()))
        self.rows = rows


_LOADED: dict[Path, tuple[torch.nn.Module, VLProcessor]] = {}  # a serving pyfunc calls predict per request
_KEEP = 4  # states kept loaded (oldest dropped first)


def _load(cfg: CmoeConfig, state_dir: Path) -> tuple[torch.nn.Module, VLProcessor]:
    """The state's model and processor, loaded once per process and state directory."""
    key = state_dir.resolve()
    if key not in _LOADED:
        if len(_LOADED) >= _KEEP:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = open_lineage(cfg, key)
    return _LOADED[key]


def predict_rows(cfg: CmoeConfig, state_dir: str | Path, images: list[Image.Image], questions: list[str]) -> list[dict]:
    """One {answer, task, confidence, margin} per row; all but the answer are None for a single-router model.
    PromptTooLongError, before any decoding, when a row's prompt would not fit the model."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: one of each per row")
    model, processor = _load(cfg, Path(state_dir))
    single = cmoe_info(model).single_router
    encoded = [processor.encode(im.convert("RGB"), q) for im, q in zip(images, questions)]
    positions = processor.config.text_config.max_position_embeddings
    too_long = {i: why for i, e in enumerate(encoded)
                if (why := _length_problem(len(e.input_ids), cfg.eval.max_new_tokens, positions))}
    if too_long:
        raise PromptTooLongError(too_long)
    out = decode(model, processor, encoded, mode="single" if single else "locator",
                 batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
    if out.located is None:
        return [{"answer": a, "task": None, "confidence": None, "margin": None} for a in out.answers]
    return [{"answer": a, "task": t, "confidence": c, "margin": m}
            for a, t, c, m in zip(out.answers, out.located, out.confidence, out.margin)]


def prompt_problem(cfg: CmoeConfig, state_dir: str | Path, image: bytes, question: str) -> str | None:
    """Why the question's prompt (image tokens, question, room for the answer) exceeds the state's
    model positions, or None: a longer prompt would be answered with confident garbage."""
    import io

    from transformers import AutoConfig

    from cmoe.model.state import base_folder, read_manifest

    state = Path(state_dir)
    base = base_folder(state, read_manifest(state))
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    processor = VLProcessor.from_pretrained(base, config)
    with Image.open(io.BytesIO(image)) as im:
        prompt = len(processor.encode(im.convert("RGB"), question).input_ids)  # as predict encodes it
    return _length_problem(prompt, cfg.eval.max_new_tokens, config.text_config.max_position_embeddings)


def _length_problem(prompt: int, answer: int, positions: int) -> str | None:
    """Why a prompt of `prompt` tokens and an answer of up to `answer` exceed `positions`, or None."""
    if prompt + answer > positions:
        return (f"too long for the model: its prompt is {prompt} tokens (image included) + {answer} "
                f"for the answer, over the model's {positions} positions")
    return None
