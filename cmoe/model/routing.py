"""Routing context: which task's router each sample of a batch uses, for forwards and `generate`.

The per-sample task indices live in one `RoutingState` shared by all CMoE layers of a model; a
context manager sets them and restores the previous value on exit (contexts nest). Because the
state is per *sample*, not per forward, it holds for every decoding step of `model.generate`: sample
i keeps its router for every generated token [12]. It is also per *thread*: concurrent calls on one
loaded model (a serving process answers requests in a thread pool) each route by their own tasks.
Modes:

- `oracle`: the task of every sample is given (training, and the oracle evaluation).
- `locator`: PTL picks the task of every sample from its pre-MoE feature; the prediction
  (probabilities, margin) is yielded so callers can log or alert on unsure routing.
- `single`: the one-shared-router baseline (a model converted with `single_router=True`); task
  labels are not needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from cmoe.model.cmoe_layer import cmoe_info
from cmoe.model.locator import LocatorPrediction, locator_features

RoutingMode = Literal["oracle", "locator", "single"]
Tasks = Sequence[int | str] | torch.Tensor


def task_indices(model: nn.Module, tasks: Tasks) -> torch.Tensor:
    """Per-sample task names or indices -> a (B,) long tensor of checked task indices."""
    names = cmoe_info(model).tasks
    if isinstance(tasks, torch.Tensor):
        ids = tasks.long().reshape(-1)
    else:
        lookup = {n: i for i, n in enumerate(names)}
        unknown = [t for t in tasks if isinstance(t, str) and t not in lookup]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; the model knows {names}")
        ids = torch.tensor([lookup[t] if isinstance(t, str) else int(t) for t in tasks], dtype=torch.long)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= len(names):
        raise ValueError(f"task indices {ids.tolist()} out of range for {len(names)} tasks {names}")
    return ids


@contextmanager
def route(model: nn.Module, tasks: Tasks | None) -> Iterator[None]:
    """Route sample i with the router of `tasks[i]` (oracle); `None` only for a single-router model."""
    info = cmoe_info(model)
    if tasks is None and not info.single_router:
        raise ValueError("this model has one router per task: pass the task of every sample")
    ids = None if tasks is None else task_indices(model, tasks)
    previous, info.routing.task_ids = info.routing.task_ids, ids
    try:
        yield
    finally:
        info.routing.task_ids = previous


@contextmanager
def route_by_locator(
    model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None, **image_inputs: torch.Tensor,
) -> Iterator[LocatorPrediction]:
    """Locate every sample's task with PTL, route by it, and yield the prediction (`image_inputs`: the
    family's other image inputs, as `locator_features` reads them)."""
    info = cmoe_info(model)
    locator = info.locator
    missing = [t for t in info.tasks if t not in locator.tasks]
    if missing:
        raise RuntimeError(f"locator routing needs a VAE for every task; missing for {missing}")
    pred = locator.predict(locator_features(model, input_ids, pixel_values, attention_mask, **image_inputs))
    with route(model, pred.names):
        yield pred


@contextmanager
def routing(
    model: nn.Module, mode: RoutingMode, tasks: Tasks | None = None, *, input_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **image_inputs: torch.Tensor,
) -> Iterator[LocatorPrediction | None]:
    """One entry point for evaluation: route a batch by `mode`; yields the locator's prediction or None."""
    if mode == "oracle":
        with route(model, tasks):
            yield None
    elif mode == "locator":
        if input_ids is None:
            raise ValueError("locator routing needs the batch's input_ids (and pixel_values)")
        with route_by_locator(model, input_ids, pixel_values, attention_mask, **image_inputs) as pred:
            yield pred
    elif mode == "single":
        if not cmoe_info(model).single_router:
            raise ValueError("mode 'single' needs a model converted with single_router=True")
        with route(model, None):
            yield None
    else:
        raise ValueError(f"unknown routing mode {mode!r}; use 'oracle', 'locator' or 'single'")
