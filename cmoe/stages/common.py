"""What every continual stage shares: opening the model lineage, encoding a task's data, the loss."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cmoe.config import CmoeConfig
from cmoe.data.bundle import TaskSpec, bundle_sha256
from cmoe.data.loading import load_split, read_task_spec
from cmoe.data.storage import fetch_bundle
from cmoe.model.base import load_base
from cmoe.model.cmoe_layer import aux_loss, balance_scope
from cmoe.model.inference import default_device
from cmoe.model.processor import Encoded, VLProcessor
from cmoe.model.state import load_state, read_manifest
from cmoe.model.surgery import convert_to_cmoe

if TYPE_CHECKING:  # only a type here; importing the trainer loads DeepSpeed
    from cmoe.stages.trainer import GlobalBatch


class StageError(RuntimeError):
    """A stage cannot run with these inputs; the message says which input and why."""


def base_dir(cfg: CmoeConfig) -> Path:
    """Where the frozen base lives: the configured checkpoint, or the tiny default under home."""
    p = Path(cfg.base.path) if cfg.base.path else cfg.home / "base"
    if not (p / "config.json").is_file():
        hint = "run `cmoe base build` first" if cfg.base.path is None else "check base.path in the config"
        raise StageError(f"{p}: no base model there ({hint})")
    return p


def open_lineage(cfg: CmoeConfig, parent_state: Path | None, *, single_router: bool = False) -> tuple[nn.Module, VLProcessor]:
    """The CMoE model to build on (the parent state, or the base freshly upcycled) on the GPU when
    there is one, else the CPU; plus its processor."""
    if parent_state is not None:
        model = load_state(parent_state)
        manifest = read_manifest(Path(parent_state))
        b = Path(parent_state) / "base" if manifest["base"]["copied"] else Path(manifest["base"]["path"])
        _, processor = load_base(b)  # tokenizer + image processor travel with the base
        return model.eval().to(default_device()), processor
    b = base_dir(cfg)
    model, processor = load_base(b)
    convert_to_cmoe(model, cfg.moe, single_router=single_router, base_path=str(b.resolve()))
    return model.to(default_device()), processor


@dataclass
class TaskData:
    """One task's split, encoded once: tensors for training, raw rows for generation and scoring."""

    spec: TaskSpec
    sha256: str
    encoded: list[Encoded]
    images: list
    questions: list[str]
    answers: list[list[str]]


def load_task(bundle: str, split: str, processor: VLProcessor, cfg: CmoeConfig, *, with_answers: bool) -> TaskData:
    """Validate the bundle, load `split` with `datasets`, apply the task's instruction template, encode."""
    rows = load_split(bundle, split, cache_dir=cfg.home / "cache")  # validates first, refuses a bad bundle
    spec = read_task_spec(bundle)
    sha = bundle_sha256(fetch_bundle(bundle, cache_dir=cfg.home / "cache"))
    template = spec.instruction or "{question}"
    questions = [template.format(question=q) for q in rows["question"]]
    images = list(rows["image"])
    answers = [list(a) for a in rows["answers"]]
    encoded = [processor.encode(im, q, a if with_answers else None)
               for im, q, a in zip(images, questions, rows["answer"])]
    return TaskData(spec, sha, encoded, images, questions, answers)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (train, held-out) split of range(n): the probe scores on data it did not train on."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = max(1, int(round(n * fraction)))
    return sorted(idx[k:]), sorted(idx[:k])


def moe_loss(model: nn.Module, batch: dict, glob: GlobalBatch) -> torch.Tensor:
    """This micro-batch's share of: token-mean LM loss on the answers + weighted load balancing of the global batch."""
    with balance_scope(model, batch.get("attention_mask"), glob.reduce_sum):
        lm = model(**batch, num_items_in_batch=glob.label_tokens).loss  # sum / global count: HF's convention
    # Each micro-step's balance loss covers all ranks' current micro-batches; the step averages them.
    return lm + aux_loss(model) / glob.micro_steps
