"""What every continual stage shares: opening the lineage, reading a task's data (train rows under the
rehearsal guard, old tasks only through their kept evaluation sets), encoding it, the loss."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, overload

import torch
from torch import nn

from cmoe.config import CmoeConfig
from cmoe.data.bundle import TaskSpec
from cmoe.data.evalsets import EvalSet, EvalSetRef, eval_set_of, keep_eval_set, open_eval_set, store_location
from cmoe.data.guard import training_scope
from cmoe.data.loading import load_split
from cmoe.data.validate import ValidatedBundle
from cmoe.model.base import BaseModelError, load_base, load_model
from cmoe.model.cmoe_layer import aux_loss, balance_scope, cmoe_info
from cmoe.model.gradient_checkpointing import enable_gradient_checkpointing
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
    there is one, else the CPU, its base loaded as `base.dtype` and `base.attn_implementation` say
    and its decoder checkpointed under `expand.gradient_checkpointing`; plus its processor."""
    loader = partial(load_model, dtype=cfg.base.dtype, attn_implementation=cfg.base.attn_implementation)
    try:
        if parent_state is not None:
            model = load_state(parent_state, base_loader=loader)
            manifest = read_manifest(Path(parent_state))
            b = Path(parent_state) / "base" if manifest["base"]["copied"] else Path(manifest["base"]["path"])
            processor = VLProcessor.from_pretrained(b, model.config)  # its files travel with the base
            model.eval()
        else:
            b = base_dir(cfg)
            model, processor = load_base(b, cfg.base.dtype, cfg.base.attn_implementation)
            convert_to_cmoe(model, cfg.moe, single_router=single_router, base_path=str(b.resolve()))
    except BaseModelError as err:  # a base this machine cannot load as configured: one line, not a traceback
        raise StageError(str(err)) from None
    if cfg.expand.gradient_checkpointing:  # only forwards that train recompute: evaluation is unchanged
        enable_gradient_checkpointing(model)
    return model.to(default_device()), processor


class EncodedRows(Sequence[Encoded]):
    """A task's rows, each encoded the first time it is read and kept from then on.

    The probe reads only its steps' batches and its held-out slice (about two thirds of the rows on
    coin-mini), so it pays for encoding only those; a full pass (the expansion, an evaluation)
    encodes every row once, as eager encoding did.
    """

    def __init__(self, rows, spec: TaskSpec, processor: VLProcessor, *, with_answers: bool,  # noqa: ANN001 - a datasets.Dataset
                 index: Sequence[int] | None = None, cache: dict[int, Encoded] | None = None) -> None:
        self._rows, self._spec, self._processor, self._with_answers = rows, spec, processor, with_answers
        self._index = range(len(rows)) if index is None else index  # position -> row of `rows`
        self._cache = {} if cache is None else cache  # row of `rows` -> its encoding, shared by selections

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, i: int) -> Encoded: ...
    @overload
    def __getitem__(self, i: slice) -> list[Encoded]: ...
    def __getitem__(self, i: int | slice) -> Encoded | list[Encoded]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self._index[i]  # IndexError past the end, which also ends iteration
        if row not in self._cache:
            r = self._rows[row]
            question = (self._spec.instruction or "{question}").format(question=r["question"])
            self._cache[row] = self._processor.encode(r["image"], question, r["answer"] if self._with_answers else None)
        return self._cache[row]

    def select(self, positions: Sequence[int]) -> EncodedRows:
        """The rows at `positions`, in that order, sharing this sequence's encodings (a split, not a copy)."""
        return EncodedRows(self._rows, self._spec, self._processor, with_answers=self._with_answers,
                           index=[self._index[p] for p in positions], cache=self._cache)


@dataclass
class TaskData:
    """One task's rows: tensors for training (encoded on first use), reference answers for scoring."""

    spec: TaskSpec
    encoded: EncodedRows
    answers: list[list[str]]


def encode_rows(spec: TaskSpec, rows, processor: VLProcessor, *, with_answers: bool) -> TaskData:  # noqa: ANN001 - a datasets.Dataset
    """The task's canonical rows under its instruction template, encoded as they are read."""
    return TaskData(spec, EncodedRows(rows, spec, processor, with_answers=with_answers),
                    [list(a) for a in rows["answers"]])


def learned_train_splits(model: nn.Module) -> dict[str, str]:
    """{train-split sha256: task} of every task the model has learned: what the guard refuses."""
    records = cmoe_info(model).task_records
    return {r["train_sha256"]: task for task, r in records.items() if r.get("train_sha256")}


def load_train(cfg: CmoeConfig, bundle: ValidatedBundle, model: nn.Module, processor: VLProcessor) -> TaskData:
    """The new task's training rows, encoded with answers; refused if `model` learned this data before."""
    if bundle.name in cmoe_info(model).tasks:
        raise StageError(f"{bundle.uri}: task {bundle.name!r} is already in this lineage; a task is learned once")
    with training_scope(bundle, learned_train_splits(model)):  # rehearsal-free, checked by content
        rows = load_split(bundle, "train", cache_dir=cfg.home / "cache")
    return encode_rows(bundle.spec, rows, processor, with_answers=True)


def record_task(model: nn.Module, bundle: ValidatedBundle, eval_set: EvalSetRef | None) -> None:
    """Record where the task just added to `model` came from, and its kept evaluation set."""
    info = cmoe_info(model)
    info.task_records[bundle.name] = {
        "bundle_sha256": bundle.sha256, "train_sha256": bundle.split_sha256["train"],
        "eval_set": asdict(eval_set) if eval_set is not None else None,
    }


def keep_task_eval_set(cfg: CmoeConfig, bundle: ValidatedBundle, store: str | None = None) -> EvalSetRef:
    """Keep `bundle`'s evaluation set as `data:` says (eval_keep, eval_seed) in `store`
    (default: data.eval_store, else <home>/evalsets); its reference."""
    return keep_eval_set(bundle, store or store_location(cfg.data.eval_store, cfg.home), cache_dir=cfg.home / "cache",
                         keep=cfg.data.eval_keep, seed=cfg.data.eval_seed)


def task_eval_set(cfg: CmoeConfig, bundle: ValidatedBundle) -> EvalSet:
    """The evaluation set `keep_task_eval_set` would keep, in memory only (for in-process evaluation)."""
    return eval_set_of(bundle, cache_dir=cfg.home / "cache", keep=cfg.data.eval_keep, seed=cfg.data.eval_seed)


def kept_eval_sets(cfg: CmoeConfig, model: nn.Module, tasks: list[str] | None = None) -> list[EvalSet]:
    """Every learned task's kept evaluation set (or those of `tasks`), in task order: what re-testing
    reads (never a bundle)."""
    info = cmoe_info(model)
    refs = []
    for task in info.tasks if tasks is None else [t for t in info.tasks if t in tasks]:
        entry = info.task_records.get(task, {}).get("eval_set")
        if entry is None:
            raise StageError(f"task {task!r} has no kept evaluation set in this state: it cannot be re-tested "
                             "(states written before cmoe kept evaluation sets must be re-learned)")
        refs.append(EvalSetRef.from_dict(entry))
    return [open_eval_set(ref, cache_dir=cfg.home / "cache") for ref in refs]


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
