"""A task's low-rank change to the base experts of one CMoE layer: the `delta` form of growth.

A task that needs new knowledge can grow, instead of new experts, a rank-r change `W + B A` of
every linear of every upcycled base expert, in every CMoE layer (docs/method.md, choice 5b). The change belongs to the task like its router: it is applied only to the tokens
routed with that task, every other task runs the experts unchanged, so nothing an earlier task
learned moves. Knowledge still passes on: a task inherits the delta of the earlier task its router
starts from (docs/method.md, choice 8), runs with it at no cost when its probe finds nothing to add,
and starts its own from a copy of it when it grows; with nothing to inherit, B starts at zero, so a
new delta starts as no change at all.

Only the base experts get one: they are never compacted, merged or retired, so the expert a delta
belongs to keeps its index for the life of the lineage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRank(nn.Module):
    """The trainable `B A` (out, in) of one linear: A (rank, in) random, B (out, rank) zero."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, linear.in_features, device=linear.weight.device) / linear.in_features ** 0.5)
        self.b = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))


class ExpertDelta(nn.Module):
    """One task's deltas in one layer: `experts[e][name]` changes linear `name` of base expert e.

    Empty (no parameters) for a task that grew none here; state-dict names `<e>.<linear>.a|b`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList()

    def grow(self, experts: list[nn.Module], rank: int, start: ExpertDelta | None = None) -> None:
        """Give every linear child of every expert in `experts` a rank-`rank` change (fp32, trainable):
        a copy of `start`'s when that is one of this rank, else one that changes nothing yet."""
        if rank < 1:
            raise ValueError(f"a delta needs rank >= 1, got {rank}")
        if len(self.experts):
            raise RuntimeError("this task already has a delta in this layer")
        for expert in experts:
            self.experts.append(nn.ModuleDict(
                {name: LowRank(child, rank) for name, child in expert.named_children() if isinstance(child, nn.Linear)}))
        if start is not None and start.rank == rank:
            with torch.no_grad():
                for mine, theirs in zip(self.parameters(), start.parameters()):
                    mine.copy_(theirs)
        self.requires_grad_(True)

    @property
    def rank(self) -> int | None:
        """The rank of this delta's changes (None when empty)."""
        return next(iter(self.experts[0].values())).a.shape[0] if len(self.experts) else None

    def __bool__(self) -> bool:
        return len(self.experts) > 0

    def applied(self, experts: list[nn.Module]) -> list[nn.Module]:
        """`experts` with this delta's changes on the first ones (the base experts), for one forward."""
        return [Changed(x, d) for x, d in zip(experts, self.experts)] + list(experts[len(self.experts):])


class Changed(nn.Module):
    """A gated-MLP expert (`gate_proj`, `up_proj`, `down_proj`, `act_fn`: what CMoE upcycles) run with
    a delta's changes added, `linear(h) + h A^T B^T`, in fp32 (the change trains in fp32).

    The expert itself is only read, never swapped or written (unlike `torch.func.functional_call`),
    so threads serving different tasks from one model at once do not see each other's changes.
    """

    def __init__(self, expert: nn.Module, change: nn.ModuleDict) -> None:
        super().__init__()
        self.change = change  # first, so `parameters()` starts with an fp32 tensor: `run_each` feeds it fp32
        self.expert = expert

    def _linear(self, name: str, h: torch.Tensor) -> torch.Tensor:
        m: nn.Linear = getattr(self.expert, name)
        y = F.linear(h, m.weight.float(), None if m.bias is None else m.bias.float())
        low = self.change[name] if name in self.change else None
        return y if low is None else y + (h @ low.a.t()) @ low.b.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self._linear("down_proj", self.expert.act_fn(self._linear("gate_proj", x)) * self._linear("up_proj", x))
