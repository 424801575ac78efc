"""Gradient checkpointing of the text decoder (expand.gradient_checkpointing), with CMoE routing replayed.

Each decoder layer keeps only its inputs for the backward and runs its forward again there
(transformers' checkpointing, non-reentrant: the CMoE layers' aux losses are built in the forward
and must keep their graph, which the reentrant variant would not record). A CMoE layer's forward
reads the model's `RoutingState`: which router each sample uses, which tokens the balance loss
counts, how it sums over ranks. The recompute runs in the backward, after the routing context may
have changed and on a thread of autograd's (the GPU's backward runs on its own thread, where the
thread-local state is unset), so each layer's recompute gets the state its forward saw; the sums
over ranks its forward made are replayed, not recomputed (no collective inside the backward, and
bit-identical counts). Nothing else changes: the loss and the gradients are those of a run without
checkpointing (tests/model/test_gradient_checkpointing.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial

import torch
from torch import nn

from cmoe.model.cmoe_layer import RoutingState, cmoe_info
from cmoe.model.surgery import text_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every layer of `model`'s text decoder in training-mode forwards that build a graph
    (evaluation and decoding are unchanged); a CMoE model's recomputes route as its forwards did."""
    decoder = text_model(model)
    routing = cmoe_info(model).routing if hasattr(model, "cmoe") else None
    kwargs = {"use_reentrant": False, **({"context_fn": partial(_contexts, routing)} if routing else {})}
    decoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    # transformers also makes the input embeddings require grad (the reentrant variant needs it): the
    # backward would then run through the frozen layers below the lowest CMoE layer, for nothing.
    decoder.disable_input_require_grads()


def _contexts(state: RoutingState) -> tuple[AbstractContextManager, AbstractContextManager]:
    """torch.utils.checkpoint's `context_fn`, called as one layer's forward starts: (a context around
    that forward, recording its sums over ranks; one around its recompute, replaying them)."""
    saved = (state.task_ids, state.token_mask, state.reduce_sum)
    sums: list[torch.Tensor] = []
    return _recording(state, sums), _Replay(state, saved, sums)


@contextmanager
def _recording(state: RoutingState, sums: list[torch.Tensor]) -> Iterator[None]:
    """The forward's sums over ranks, each kept in `sums` as it is made."""
    reduce_sum = state.reduce_sum
    if reduce_sum is not None:
        state.reduce_sum = lambda t: _kept(reduce_sum(t), sums)
    try:
        yield
    finally:
        state.reduce_sum = reduce_sum


def _kept(t: torch.Tensor, into: list[torch.Tensor]) -> torch.Tensor:
    into.append(t)
    return t


class _Replay:
    """The recompute's routing: the state the forward saw, its sums over ranks given back in order.

    A class, not a generator: a second backward through the same graph (retain_graph) enters it again.
    """

    def __init__(self, state: RoutingState, saved: tuple, sums: list[torch.Tensor]) -> None:
        self.state, self.saved, self.sums = state, saved, sums

    def __enter__(self) -> None:
        s = self.state
        self.previous = (s.task_ids, s.token_mask, s.reduce_sum, s.replaying)
        task_ids, token_mask, reduce_sum = self.saved
        given = iter(self.sums)
        replayed: Callable[[torch.Tensor], torch.Tensor] = lambda _: next(given)  # noqa: E731
        s.task_ids, s.token_mask = task_ids, token_mask
        s.reduce_sum = None if reduce_sum is None else replayed
        s.replaying = True

    def __exit__(self, *exc: object) -> None:
        s = self.state
        s.task_ids, s.token_mask, s.reduce_sum, s.replaying = self.previous
