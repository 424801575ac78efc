"""Task retirement: a new state without one task — the "forget this task's data" request of a data owner.

The retired task loses its router, its locator VAE, its record (and with it the reference to its
kept evaluation set) and every expert it added that no other task uses; the model layer does the
surgery (`cmoe.model.cmoe_layer.retire_task`), this stage decides what "uses" means and checks
that nothing else moved:

- **Usage is measured, not assumed.** Only routers of tasks learned *after* the retired one cover
  its experts. Each of those tasks answers its own kept evaluation set with its own router (oracle
  routing, the batched greedy decoding evaluation uses) while every top-k choice is counted
  (`record_routing`). An expert picked even once is kept, frozen, and goes to the next task; the
  others are removed. The counts are part of the result, per expert and per task. They include
  the padding positions of each batch's first step: an error on the safe side (an expert kept
  that could have gone, never one dropped that a real token picks).
- **The check.** The first `eval.batch_size` prompts of every remaining task's evaluation set are
  routed and scored before and after the surgery, one at a time (no padding positions, whose
  top-k is arbitrary). The top-k counts of every remaining expert must be the same, and the
  logits of the first answer token the same up to float rounding: removing a logit the router never
  picks changes its softmax's sum in the last bits, so bit-identical outputs are not promised for
  the tasks after the retired one. Any other difference is an error and nothing is saved.
- The new state travels alone (base copied), as an expansion's does. The retired task's evaluation
  set itself is deleted by the flow, only once the retirement is approved: a rejected one leaves
  the champion in use, which still needs it (docs/data-lifecycle.md, "Retiring a task").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cmoe.config import CmoeConfig
from cmoe.model.cmoe_layer import cmoe_info, cmoe_layers, expert_usage, record_routing, retirable, retire_task
from cmoe.model.inference import decode, device_of
from cmoe.model.params import count_params
from cmoe.model.routing import route
from cmoe.model.state import save_state
from cmoe.stages.common import StageError, TaskData, encode_rows, kept_eval_sets, open_lineage

LOGIT_TOLERANCE = 1e-3  # relative to the largest logit: far above float rounding, far below a changed expert


@dataclass
class RetireResult:
    """The new state without `task` and what was removed or kept of it; JSON-serialisable."""

    task: str
    state_dir: str
    heir: str | None  # the task that now owns the experts kept (None: the last task was retired)
    experts: list[dict]  # per expert `task` added: layer, index (before), uses (per later task), kept
    experts_dropped: int
    experts_kept: int
    params_before: int
    params_after: int
    params_added: int  # params_after - params_before: negative, what the gate's budget reads
    remaining: list[str]  # the tasks the new state holds, in order
    max_logit_change: float  # largest change of a remaining task's check logits, relative to its largest logit
    wall_s: float


def run_retire(cfg: CmoeConfig, state_dir: Path, task: str, out_dir: Path) -> RetireResult:
    """Retire `task` from the state at `state_dir`; write the new state to out_dir/state."""
    t0 = time.perf_counter()
    model, processor = open_lineage(cfg, Path(state_dir))
    info = cmoe_info(model)
    try:
        later = info.tasks[retirable(model, task) + 1:]  # only their routers cover the task's experts
    except ValueError as err:
        raise StageError(f"{state_dir}: {err}") from None
    data = {s.spec.name: encode_rows(s.spec, s.rows, processor, with_answers=False)
            for s in kept_eval_sets(cfg, model, [t for t in info.tasks if t != task])}
    uses = {t: _usage(cfg, model, processor, data[t], t) for t in later}
    ours = [(i, e) for i, layer in cmoe_layers(model).items() for e, o in enumerate(layer.expert_origin) if o == task]
    experts = [{"layer": i, "index": e, "uses": {t: uses[t][i][e] for t in later},
                "kept": any(uses[t][i][e] for t in later)} for i, e in ours]
    drop = {(x["layer"], x["index"]) for x in experts if not x["kept"]}

    before = {t: _check_batch(cfg, model, processor, d, t) for t, d in data.items()}
    params_before = count_params(model).total
    heir = retire_task(model, task, drop)
    after = {t: _check_batch(cfg, model, processor, d, t) for t, d in data.items()}
    change = max(_compare(t, before[t], after[t], drop) for t in data)
    params_after = count_params(model).total
    state = save_state(model, Path(out_dir) / "state", copy_base=True, overwrite=True)
    return RetireResult(task, str(state), heir, experts, len(drop), len(experts) - len(drop), params_before,
                        params_after, params_after - params_before, list(info.tasks), change,
                        time.perf_counter() - t0)


def _usage(cfg: CmoeConfig, model: torch.nn.Module, processor, data: TaskData, task: str) -> dict[int, list[int]]:
    """Per layer, how often `task`'s router picks each expert while answering `task`'s evaluation set."""
    with record_routing(model):
        decode(model, processor, data.encoded, mode="oracle", task=task, batch_size=cfg.eval.batch_size,
               max_new_tokens=cfg.eval.max_new_tokens)
    return expert_usage(model)


@torch.no_grad()
def _check_batch(cfg: CmoeConfig, model: torch.nn.Module, processor, data: TaskData,
                 task: str) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """First-answer-token logits of the first `eval.batch_size` prompts of `task`'s evaluation set, and
    their top-k counts; one prompt at a time, since a padding position's top-k is arbitrary (it can
    change with the router's width) and must not count."""
    logits = []
    with route(model, [task]), record_routing(model):
        for encoded in data.encoded[: cfg.eval.batch_size]:
            batch = processor.collate([encoded], device=device_of(model))
            batch.pop("labels")
            logits.append(model(**batch, logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(logits), expert_usage(model)


def _compare(task: str, before: tuple[torch.Tensor, dict[int, list[int]]],
             after: tuple[torch.Tensor, dict[int, list[int]]], drop: set[tuple[int, int]]) -> float:
    """The relative logit change of `task`'s check batch; StageError when its routing or answers changed."""
    (logits0, counts0), (logits1, counts1) = before, after
    for layer, counts in counts0.items():
        expected = [n for e, n in enumerate(counts) if (layer, e) not in drop]
        if counts1[layer] != expected:
            raise StageError(f"retiring changed how task {task!r} routes in layer {layer}: top-k counts "
                             f"{expected} became {counts1[layer]}")
    change = float((logits1 - logits0).abs().max() / logits0.abs().max().clamp_min(1e-12))
    if change > LOGIT_TOLERANCE or not torch.equal(logits0.argmax(-1), logits1.argmax(-1)):
        raise StageError(f"retiring changed task {task!r}'s outputs: logits moved by {change:.2e} of their "
                         f"largest value (tolerance {LOGIT_TOLERANCE:.0e})")
    return change
