"""The CMoE layer: a growable pool of FFN experts with one top-k router per task (LLaVA-CMoE / CoPE).

Design decisions (in brackets: the numbered choices of docs/method.md):

- **Experts are copies of the dense MLP module itself** (`copy.deepcopy` of e.g. `LlamaMLP`), held
  in an `nn.ModuleList`. That makes the layer backbone-agnostic (Llama, Qwen2, Mistral: anything
  with a gated MLP), keeps state-dict names readable (`experts.3.gate_proj.weight`), lets every
  expert be frozen on its own (`requires_grad` is per parameter: frozen experts cost no weight
  gradients, and most experts are frozen while a task trains), and makes the dense base
  recoverable (expert 0 is never trained). Dispatch sorts tokens by expert and loops over experts
  (never over tokens). Stacked `(E, d, I)` tensors with `grouped_mm` behind the same dispatch were
  measured (`python -m benchmarks.moe_layer`, docs/benchmarks.md): slower on one thread, faster
  only on two contended threads at the tiniest size, where the count of small ops dominates.
- **Upcycling** [1]: E0 identical copies; since the top-k gates are renormalised to sum to 1, the
  layer's output equals the dense MLP's at construction, whatever the router says.
- **Routers** [8]: task t owns a bias-free `d -> E_t` weight (a `Parameter` in `routers`, index =
  task index) over the experts that existed when it was created, plus the experts added while t is
  the current task. Experts added by later tasks are masked out (`-inf` logit) for older routers,
  so an old task's routing is bit-identical forever. A new router copies the previous router's
  columns and gets small random columns (std `ROUTER_INIT_STD`) for experts it has not seen.
  The first router starts from the base router when the base went through the MoE stage
  (`base_router`, loaded by `cmoe.model.moe_base`), else at random.
- **Single-router baseline**: one shared router (index 0) that every task trains and that grows a
  column per new expert; old experts are still frozen.
- **Deltas** [5b]: task t may own, per layer, a low-rank change of the base experts
  (`cmoe.model.expert_delta`), applied only to tokens routed with t; `delta_uses[t]` says whose delta
  t runs with: its own, the one of the task its router was started from (inherited, owning no
  parameters), or none. A batch with several tasks dispatches once per task that has a delta.
- **Probe experts** [2]: one temporary expert per layer, scored by the current router through an
  extra last column. Attaching snapshots the router; dropping restores the snapshot exactly;
  promoting keeps the trained probe and router as the warm start of a real expert [5].
- **Retiring a task** (`retire_task`, the "forget this task's data" request): its router, its
  locator VAE and its record go; of the experts it added, those no other router selects are
  removed (with their rows of the later routers; older routers never covered them) and the rest
  stay, frozen, re-assigned to the *next* task, whose router selects them. Their positions then
  sit right before that task's own experts, so a saved state replays in task order unchanged.
  What "selects" means is measured by the caller (`cmoe.stages.retire`). Every other router keeps
  its experts, so the remaining tasks route as before. A single-router model cannot retire a task
  (its one router learned them all).
- **Compaction** (`remove_expert`, `merge_experts`; the decisions are `cmoe.model.compaction`'s):
  a task expert leaves the pool with its column of every router that covers it; two merge into one
  at the earlier position (owned by the earlier task, weights averaged), and each router that
  covered both keeps one of their two columns. Upcycled base experts are never touched. Experts
  stay in task order, so a compacted state replays like any other.
- **Aux loss**: `E * sum_e mean_prob_e * top1_fraction_e` (MoE-LLaVA / DeepSpeed), computed per
  task present in the batch over that task's tokens and weighted by its token share, so it only
  pushes on the router that is training [7]. Under `balance_scope` (training) padding tokens do
  not count and the counts are global-batch counts, summed over data-parallel ranks (Megatron's
  "global" balancing; MoE-LLaVA balances each rank's micro-batch): the loss no longer depends on
  how the batch is split, so N ranks train exactly as one process.
- No capacity factor: with per-task routers and tiny batches dropping tokens only adds noise.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.model.expert_delta import ExpertDelta
from cmoe.model.locator import TaskLocator

ROUTER_INIT_STD = 0.02  # HF `initializer_range` default; small so new columns start near uniform
EXPERT_INIT_STD = 0.02  # for init="random" experts
BASE = "base"  # origin of the upcycled experts
ExpertInit = Literal["copy", "probe", "random"]
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class RoutingState(threading.local):
    """Per-sample task indices, shared by every CMoE layer of one model; set by `routing.route`.

    While training, `balance_scope` also sets which tokens count for load balancing (not padding)
    and how to sum its statistics over data-parallel ranks. Each thread has its own values (a
    `threading.local`): a serving process answers concurrent requests with one loaded model in a
    thread pool, and each request's forwards must see its own routing, not the last one set.
    Gradient checkpointing (`cmoe.model.gradient_checkpointing`) recomputes a layer's forward in
    the backward, on whichever thread autograd runs it, with the values the forward saw and
    `replaying` set.
    """

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # (B, S) bool: tokens the balance loss counts
        self.reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None  # sum over ranks
        # A recompute for the backward: the layers' aux losses and routing counts are the forward's.
        self.replaying = False

    def __deepcopy__(self, memo: dict) -> RoutingState:
        """A copied model starts unrouted: routing belongs to a call, not to the weights (and a
        `threading.local` cannot be copied)."""
        return RoutingState()


@dataclass(frozen=True)
class ProbeScore:
    """Routing statistics of one layer's probe expert (PGKE): what the expansion plan is made of."""

    share: float  # fraction of tokens whose top-k includes the probe [3]
    mass: float  # mean router probability on the probe
    num_experts: int  # E_l without the probe, for the uniform threshold k / (E_l + 1) [4]
    tokens: int


class _PermuteRows(torch.autograd.Function):
    """`x[perm]` whose backward is `grad[inverse]`: a gather instead of a scatter-add.

    `index_select`'s backward is an `index_add_`, which on CPU cost ~10 % of the whole layer in
    profiles; for a permutation the inverse permutation gives the same gradient as a cheap gather.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def topk_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax router logits (N, E), keep the top-k, renormalise: (gates, expert idx, probs)."""
    probs = logits.float().softmax(dim=-1)
    gates, idx = probs.topk(k, dim=-1)
    return gates / gates.sum(dim=-1, keepdim=True), idx, probs


def load_balancing_loss(
    probs: torch.Tensor, idx: torch.Tensor, task_of: torch.Tensor | None = None, router_sizes: list[int] | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """MoE-LLaVA's aux loss `E_t * sum_e mean_prob_e * top1_fraction_e` per router, weighted by token share.

    probs (N, E) and top-k idx (N, k) of N tokens; `task_of` (N,) says whose router each token used
    (default: all router 0) and `router_sizes[t]` how many experts router t spans (default: E).
    The top-1 and token counts are summed with `reduce_sum` (over data-parallel ranks): the loss is
    then that of the global batch, and what each rank returns is its tokens' part of it (the parts
    add up, so N ranks train as one process would). Counts carry no gradient, as in DeepSpeed.
    """
    n, n_experts = probs.shape
    task_of = torch.zeros(n, dtype=torch.long, device=probs.device) if task_of is None else task_of
    sizes = torch.tensor(router_sizes or [n_experts], dtype=probs.dtype, device=probs.device)
    counts = probs.new_zeros(len(sizes), n_experts + 1)  # top-1 counts per router, then its token count
    counts.index_put_((task_of, idx[:, 0]), probs.new_ones(n), accumulate=True)
    counts[:, n_experts] = torch.bincount(task_of, minlength=len(sizes)).to(probs.dtype)
    if reduce_sum is not None:
        counts = reduce_sum(counts)
    tokens = counts[:, n_experts]
    prob_sums = probs.new_zeros(len(sizes), n_experts).index_add(0, task_of, probs)  # differentiable
    # sum_t (N_t/N) * E_t * sum_e (count_te/N_t) * (prob_sum_te/N_t); empty routers contribute 0
    weight = sizes / (tokens.sum().clamp(min=1) * tokens.clamp(min=1))
    return (weight.unsqueeze(1) * counts[:, :n_experts] * prob_sums).sum()


GroupedExperts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dispatch(x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, n_experts: int, run: GroupedExperts) -> torch.Tensor:
    """Send each token (N, d) to its k experts grouped per expert, mix the outputs by gate.

    `run(rows, counts)` gets the token rows sorted by expert (`counts[e]` rows for expert e, in
    expert order) and returns their expert outputs in the same order; `run_each` loops over expert
    modules (the layer's choice), the benchmark plugs a stacked `grouped_mm` in for comparison.
    """
    n, d = x.shape
    k = idx.shape[1]
    flat = idx.reshape(-1)  # row r = token r // k, choice r % k
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    # expand+reshape (backward = a sum over k) rather than repeat_interleave (backward = scatter)
    rows = _PermuteRows.apply(x.unsqueeze(1).expand(n, k, d).reshape(n * k, d), order, inverse)
    ys = _PermuteRows.apply(run(rows, torch.bincount(flat, minlength=n_experts)), inverse, order).view(n, k, d)
    return (ys * gates.to(ys.dtype).unsqueeze(-1)).sum(dim=1)  # a (N,1,k)@(N,k,d) bmm is ~5x slower on CPU


def run_each(experts: list[nn.Module]) -> GroupedExperts:
    """`dispatch`'s expert step as a loop over expert modules (never over tokens); empty groups skipped.

    An expert whose weights are not in the tokens' dtype (a trained fp32 expert beside a bf16
    base's: base.dtype) gets its tokens in its own dtype and gives its outputs back in theirs.
    """

    def run(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs = []
        for expert, chunk in zip(experts, rows.split(counts.tolist())):
            if chunk.shape[0] == 0:
                outs.append(chunk)
            elif (dtype := next(expert.parameters()).dtype) == chunk.dtype:
                outs.append(expert(chunk))
            else:
                outs.append(expert(chunk.to(dtype)).to(chunk.dtype))
        return torch.cat(outs)

    return run


class CMoELayer(nn.Module):
    """Drop-in replacement of one decoder layer's MLP: upcycled experts + per-task routers."""

    def __init__(
        self, dense: nn.Module, hidden_size: int, num_experts: int, top_k: int, layer_index: int,
        routing: RoutingState, single_router: bool = False,
    ) -> None:
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.layer_index = layer_index
        self.single_router = single_router
        self.routing = routing  # plain attribute: one object shared by all layers of the model
        self.experts = nn.ModuleList(_frozen_copy(dense) for _ in range(num_experts))
        self.expert_origin: list[str] = [BASE] * num_experts
        self.routers = nn.ParameterList()
        self.deltas = nn.ModuleList()  # task index -> its own ExpertDelta (empty unless it grew one here)
        # task index -> the task whose delta it runs with: itself, the earlier task it inherited one
        # from (no parameters of its own), or None [5b]
        self.delta_uses: list[int | None] = []
        self.probe: nn.Module | None = None
        self._router_before_probe: torch.Tensor | None = None
        # The MoE stage's trained router over the E0 base experts (None for copies of a dense base):
        # the first router's start. A buffer so it moves with the model; not saved in state dicts.
        self.register_buffer("base_router", None, persistent=False)
        self.aux_loss: torch.Tensor | None = None  # set by every forward with grad enabled
        self.stats: dict[str, torch.Tensor] | None = None  # counts of the last `record_routing`
        self.recording = False

    # ---------------------------------------------------------------- forward
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Route every token with its sample's task router and mix its top-k experts."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        tasks, token_task = self._token_tasks(shape[0], x.shape[0] // shape[0], x.device)
        logits = self._router_logits(x, tasks, token_task)
        gates, idx, probs = topk_route(logits, self.top_k)
        # A recompute computes the aux loss too (the forward's loss reads the tensors it saves) but
        # keeps the forward's: the loss was built from that one.
        aux = self._aux_loss(probs, idx, tasks, token_task) if torch.is_grad_enabled() else None
        if not self.routing.replaying:
            self.aux_loss = aux
            if self.recording:
                self._record(probs, idx)
        experts = self._active_experts()
        if token_task is None:  # one task in the batch: training, and most evaluation batches
            return dispatch(x, idx, gates, len(experts), run_each(self._experts_for(tasks[0], experts))).view(shape)
        if not any(self._delta(t) for t in tasks):
            return dispatch(x, idx, gates, len(experts), run_each(experts)).view(shape)
        # A task with a delta runs its experts changed: one dispatch per task in the batch, never per token.
        out = torch.empty_like(x)
        for t in tasks:
            rows = (token_task == t).nonzero().squeeze(1)
            ys = dispatch(x[rows], idx[rows], gates[rows], len(experts), run_each(self._experts_for(t, experts)))
            out = out.index_copy(0, rows, ys)
        return out.view(shape)

    def _delta(self, t: int) -> ExpertDelta | None:
        """The delta task t runs with in this layer (its own or an inherited one), if any."""
        u = self.delta_uses[t] if t < len(self.delta_uses) else None
        return self.deltas[u] if u is not None and self.deltas[u] else None

    def _experts_for(self, t: int, experts: list[nn.Module]) -> list[nn.Module]:
        """The experts as task t runs them: changed by its delta, if it has one here [5b]."""
        delta = self._delta(t)
        return delta.applied(experts) if delta is not None else experts

    def _token_tasks(self, batch: int, seq: int, device: torch.device) -> tuple[list[int], torch.Tensor | None]:
        """The task indices present, and each token's task (N,) when there is more than one."""
        if self.single_router:
            return [0], None
        ids = self.routing.task_ids
        if ids is None:
            raise RuntimeError(
                f"CMoE layer {self.layer_index}: no routing set; run the forward/generate inside "
                "`with cmoe.model.routing.route(model, tasks):`"
            )
        if batch != ids.numel():
            # generate() expands beams / return sequences with repeat_interleave: follow it
            if batch % ids.numel():
                raise RuntimeError(
                    f"CMoE layer {self.layer_index}: batch of {batch} does not match {ids.numel()} routed samples"
                )
            ids = ids.repeat_interleave(batch // ids.numel())
        tasks = ids.unique().tolist()  # over samples, not tokens: cheap
        return tasks, None if len(tasks) == 1 else ids.to(device).repeat_interleave(seq)

    def _router_logits(self, x: torch.Tensor, tasks: list[int], token_task: torch.Tensor | None) -> torch.Tensor:
        """Logits (N, E_all) of each token under its task's router; experts it does not know get -inf."""
        n_all = len(self._active_experts())
        logits: torch.Tensor | None = None
        for t in tasks:  # a loop over the tasks in the batch (usually one), never over tokens
            w = self.routers[t]
            lt = F.linear(x.float(), w.float())
            if w.shape[0] < n_all:
                lt = F.pad(lt, (0, n_all - w.shape[0]), value=float("-inf"))
            # the first task fills every row; each further task overwrites its own rows
            logits = lt if logits is None else torch.where((token_task == t).unsqueeze(1), lt, logits)
        assert logits is not None
        return logits

    def _aux_loss(
        self, probs: torch.Tensor, idx: torch.Tensor, tasks: list[int], token_task: torch.Tensor | None,
    ) -> torch.Tensor:
        """Load-balancing loss of this forward's tokens (padding left out under `balance_scope`)."""
        task_of = token_task if token_task is not None else torch.full(
            (probs.shape[0],), tasks[0], dtype=torch.long, device=probs.device)
        routers = [r.shape[0] for r in self.routers]
        keep = self.routing.token_mask
        if keep is not None:
            if keep.numel() != probs.shape[0]:
                raise RuntimeError(f"CMoE layer {self.layer_index}: token mask of {keep.numel()} tokens "
                                   f"for {probs.shape[0]} routed tokens")
            rows = keep.reshape(-1).to(probs.device).nonzero().squeeze(1)
            probs, idx, task_of = probs[rows], idx[rows], task_of[rows]
        return load_balancing_loss(probs, idx, task_of, routers, self.routing.reduce_sum)

    @torch.no_grad()
    def _record(self, probs: torch.Tensor, idx: torch.Tensor) -> None:
        assert self.stats is not None
        n_all = probs.shape[1]
        self.stats["tokens"] += probs.shape[0]
        self.stats["topk_counts"] += torch.bincount(idx.reshape(-1), minlength=n_all).cpu()
        self.stats["prob_sum"] += probs.sum(dim=0).cpu()

    def _active_experts(self) -> list[nn.Module]:
        return [*self.experts, *([self.probe] if self.probe is not None else [])]

    # ---------------------------------------------------------------- growth
    def add_router(self) -> None:
        """Add the next task's router over all current experts, warm-started from the last one (or the base router) [8]."""
        self._no_probe("add a router")
        self.routers.append(nn.Parameter(self._router_from(self.routers[-1] if len(self.routers) else None)))
        self.deltas.append(ExpertDelta())
        self.delta_uses.append(None)

    def restart_router(self, source: int | None) -> None:
        """Re-start the current (newest) router as a copy of router `source` (None: the base router) [8]."""
        self._no_probe("restart a router")
        old = self.routers[-1]
        w = self._router_from(self.routers[source] if source is not None else None)
        self.routers[-1] = nn.Parameter(w, requires_grad=old.requires_grad)

    def _router_from(self, prev: torch.Tensor | None) -> torch.Tensor:
        """A router over all current experts: `prev`'s columns (the base router's when None) for the experts
        it knew, small random ones for the rest."""
        device = next(self.experts[0].parameters()).device  # fp32 whatever the base's dtype: a router trains
        w = torch.randn(len(self.experts), self.hidden_size, device=device, dtype=torch.float32) * ROUTER_INIT_STD
        prev = prev.detach() if prev is not None else self.base_router
        if prev is not None:
            w[: prev.shape[0]] = prev
        return w

    def add_expert(self, task: str, init: ExpertInit = "copy", source: int = 0) -> int:
        """Append an expert owned by `task` (copy of expert `source`, the probe, or random); its index."""
        if init == "probe":
            return self.promote_probe(task)
        self._no_probe("add an expert")
        expert = _trainable_copy(self.experts[source])
        if init == "random":
            _reinit(expert)
        elif init != "copy":
            raise ValueError(f"unknown expert init {init!r}; use 'copy', 'probe' or 'random'")
        self.experts.append(expert)
        self.expert_origin.append(task)
        self._grow_router()
        return len(self.experts) - 1

    def add_delta(self, rank: int) -> int:
        """Give the current task its own rank-`rank` change of every base expert here, starting from
        the delta it inherited when that has this rank (else from no change) [5b]; its parameter count."""
        self._no_probe("add a delta")
        if self.single_router:
            raise ValueError("a single-router model has no per-task delta: its one router serves every task")
        delta, t = self.deltas[-1], len(self.deltas) - 1
        delta.grow([x for x, origin in zip(self.experts, self.expert_origin) if origin == BASE], rank,
                   start=self._delta(t))
        self.delta_uses[t] = t
        return sum(p.numel() for p in delta.parameters())

    def inherit_delta(self, source: int | None) -> None:
        """Let the current task run with the delta task `source` runs with (None: none), owning no parameters."""
        if self.deltas[-1]:
            raise RuntimeError(f"CMoE layer {self.layer_index}: the current task already grew its own delta")
        self.delta_uses[-1] = None if source is None else self.delta_uses[source]

    def _grow_router(self) -> None:
        """Give the current (trainable) router a small random column for the newest expert."""
        old = self.routers[-1]
        col = torch.randn(1, self.hidden_size, device=old.device, dtype=old.dtype) * ROUTER_INIT_STD
        self.routers[-1] = nn.Parameter(torch.cat([old.detach(), col]), requires_grad=old.requires_grad)

    def freeze(self) -> None:
        """Stop every expert and router of this layer from training (earlier tasks are done)."""
        for p in self.parameters():
            p.requires_grad_(False)

    # ---------------------------------------------------------------- probes
    def attach_probe(self, source: int) -> None:
        """Add a temporary trainable copy of expert `source`, scored by a new router column [2]."""
        self._no_probe("attach a second probe")
        self._router_before_probe = self.routers[-1].detach().clone()
        self.probe = _trainable_copy(self.experts[source])
        self._grow_router()

    def drop_probe(self) -> None:
        """Remove the probe and restore the router exactly as it was before `attach_probe`."""
        if self.probe is None:
            return
        assert self._router_before_probe is not None
        trainable = self.routers[-1].requires_grad
        self.routers[-1] = nn.Parameter(self._router_before_probe, requires_grad=trainable)
        self.probe, self._router_before_probe = None, None

    def promote_probe(self, task: str) -> int:
        """Make the trained probe a real expert of `task`; the router keeps its trained column [5]."""
        if self.probe is None:
            raise RuntimeError(f"CMoE layer {self.layer_index}: no probe attached to promote")
        self.experts.append(self.probe)  # its router column is already the last one: indices line up
        self.expert_origin.append(task)
        self.probe, self._router_before_probe = None, None
        return len(self.experts) - 1

    def probe_score(self) -> ProbeScore:
        """Share of tokens routed to the probe and its mean router mass, from `record_routing`."""
        if self.probe is None or self.stats is None or int(self.stats["tokens"]) == 0:
            raise RuntimeError(
                f"CMoE layer {self.layer_index}: probe scores need an attached probe and forwards "
                "inside `record_routing(model)`"
            )
        tokens = int(self.stats["tokens"])
        p = len(self.experts)
        return ProbeScore(
            share=float(self.stats["topk_counts"][p]) / tokens,
            mass=float(self.stats["prob_sum"][p]) / tokens,
            num_experts=len(self.experts),
            tokens=tokens,
        )

    # ---------------------------------------------------------------- retirement
    def retire(self, t: int, task: str, drop: set[int], heir: str | None) -> None:
        """Remove router `t` (of `task`) and `task`'s experts in `drop` (their rows of every router too);
        `task`'s other experts stay, frozen, as experts of `heir`."""
        ours = self.check_retire(task, drop, heir)
        routers = []
        for u, w in enumerate(self.routers):
            if u == t:
                continue
            rows = [r for r in range(w.shape[0]) if r not in drop]
            if len(rows) < w.shape[0]:
                w = nn.Parameter(w.detach()[rows], requires_grad=w.requires_grad)
            routers.append(w)
        self.routers = nn.ParameterList(routers)
        self._retire_delta(t)
        for e in ours - drop:
            self.experts[e].requires_grad_(False)
        self.experts = nn.ModuleList(x for e, x in enumerate(self.experts) if e not in drop)
        self.expert_origin = [heir if o == task else o for e, o in enumerate(self.expert_origin) if e not in drop]
        self.stats = None  # counts were sized for the experts before

    def _retire_delta(self, t: int) -> None:
        """Drop task t's delta slot; a delta later tasks inherited goes to the first of them, not away."""
        heir = next((u for u, used in enumerate(self.delta_uses) if used == t and u != t), None)
        if heir is not None:  # only an owner is inherited from: `inherit_delta` points at the owner
            self.deltas[heir] = self.deltas[t]
        uses = [heir if used == t else used for used in self.delta_uses]
        del self.deltas[t]
        self.delta_uses = [None if u is None else u - (u > t) for i, u in enumerate(uses) if i != t]

    # ---------------------------------------------------------------- compaction (cmoe.model.compaction)
    def covered_by(self, e: int) -> list[int]:
        """The routers (task indices; [0] for the shared router) whose columns include expert `e`."""
        return [u for u, w in enumerate(self.routers) if e < w.shape[0]]

    def remove_expert(self, e: int) -> None:
        """Remove task expert `e` and its column of every router that covers it (bounded growth)."""
        self._check_compactable(e)
        self.routers = nn.ParameterList(
            nn.Parameter(w.detach()[[r for r in range(w.shape[0]) if r != e]], requires_grad=w.requires_grad)
            if e < w.shape[0] else w for w in self.routers)
        del self.experts[e]
        del self.expert_origin[e]
        self.stats = None  # counts were sized for the experts before

    def merge_experts(self, keep: int, gone: int, column_of: dict[int, int]) -> None:
        """Replace task experts `keep` < `gone` by one frozen expert at `keep` with their averaged weights
        (owned by `keep`'s task); every router that covered both keeps the column `column_of[router]`
        (`keep` or `gone`) for it and loses the other."""
        self._check_compactable(keep)
        self._check_compactable(gone)
        if keep >= gone:
            raise ValueError(f"CMoE layer {self.layer_index}: merge keeps the earlier expert ({keep} >= {gone})")
        merged = _frozen_copy(self.experts[keep])
        with torch.no_grad():
            for p, q in zip(merged.parameters(), self.experts[gone].parameters()):
                p.add_(q).mul_(0.5)
        routers = []
        for u, w in enumerate(self.routers):
            if gone < w.shape[0]:
                w = w.detach().clone()
                w[keep] = w[column_of[u]]
                w = nn.Parameter(w[[r for r in range(w.shape[0]) if r != gone]], requires_grad=self.routers[u].requires_grad)
            routers.append(w)
        self.routers = nn.ParameterList(routers)
        self.experts[keep] = merged
        del self.experts[gone]
        del self.expert_origin[gone]
        self.stats = None

    def snapshot(self) -> tuple[list[nn.Module], list[nn.Parameter], list[str]]:
        """Experts, routers and origins as they are: `restore` undoes a compaction step exactly
        (the steps replace modules and router tensors, never change them in place)."""
        return list(self.experts), list(self.routers), list(self.expert_origin)

    def restore(self, snap: tuple[list[nn.Module], list[nn.Parameter], list[str]]) -> None:
        """Put back what `snapshot` saw."""
        experts, routers, origins = snap
        self.experts, self.routers, self.expert_origin = nn.ModuleList(experts), nn.ParameterList(routers), list(origins)
        self.stats = None

    def _check_compactable(self, e: int) -> None:
        self._no_probe("compact experts")
        if not 0 <= e < len(self.experts):
            raise IndexError(f"CMoE layer {self.layer_index}: no expert {e} (it has {len(self.experts)})")
        if self.expert_origin[e] == BASE:
            raise ValueError(f"CMoE layer {self.layer_index}: expert {e} is an upcycled base expert, never changed")

    def check_retire(self, task: str, drop: set[int], heir: str | None) -> set[int]:
        """`task`'s experts in this layer, once it is sure `retire` can drop `drop` and hand the rest to `heir`."""
        self._no_probe("retire a task")
        ours = {e for e, origin in enumerate(self.expert_origin) if origin == task}
        if not drop <= ours:
            raise ValueError(f"CMoE layer {self.layer_index}: experts {sorted(drop - ours)} are not task {task!r}'s")
        if ours - drop and heir is None:
            raise ValueError(f"CMoE layer {self.layer_index}: experts {sorted(ours - drop)} of task {task!r} "
                             "would be kept, but no later task's router covers them")
        return ours

    def _no_probe(self, what: str) -> None:
        if self.probe is not None:
            raise RuntimeError(f"CMoE layer {self.layer_index}: cannot {what} while a probe is attached")


def _frozen_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module)
    m.requires_grad_(False)
    return m


def _trainable_copy(module: nn.Module) -> nn.Module:
    """A copy that trains: in fp32 whatever the base's dtype (base.dtype), so AdamW updates fp32
    weights, and the task is later evaluated (and saved) with exactly the weights it trained."""
    m = copy.deepcopy(module).float()
    m.requires_grad_(True)
    return m


@torch.no_grad()
def _reinit(expert: nn.Module) -> None:
    for name, p in expert.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, EXPERT_INIT_STD)


# ==================================================================== model-level bookkeeping
class CMoEInfo(nn.Module):
    """What makes a converted model a CMoE model: task order, MoE config, routing state, locator.

    Attached as `model.cmoe` by `surgery.convert_to_cmoe`. An `nn.Module` so that `model.to(...)`
    moves the locator with the model; the CMoE layers are *not* registered here (they live in the
    decoder, and registering them twice would duplicate them in the state dict).
    """

    def __init__(
        self, initial_experts: int, top_k: int, aux_loss_coef: float, single_router: bool, base_path: str | None,
    ) -> None:
        super().__init__()
        self.initial_experts = initial_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.single_router = single_router
        self.base_path = base_path
        self.base_sha256: str | None = None  # set when loaded from a state directory
        self.tasks: list[str] = []
        # Per task, plain JSON the stages record and the state saves: where its data came from
        # (bundle and train-split hashes: the rehearsal guard's keys) and its kept evaluation set.
        self.task_records: dict[str, dict] = {}
        # Plain JSON the state saves: one record per compaction (cmoe.stages.compact) of what it
        # retired and merged, so a state says how its pool came to be smaller than its tasks grew it.
        self.compactions: list[dict] = []
        self.routing = RoutingState()
        self.locator: TaskLocator = TaskLocator()

    @property
    def current_task(self) -> str:
        """The task being trained (the last one added)."""
        if not self.tasks:
            raise RuntimeError("no task yet: call add_task(model, name) first")
        return self.tasks[-1]


def cmoe_info(model: nn.Module) -> CMoEInfo:
    """The CMoE bookkeeping of a converted model, with a clear error for a plain model."""
    info = getattr(model, "cmoe", None)
    if not isinstance(info, CMoEInfo):
        raise TypeError("not a CMoE model: convert it with cmoe.model.surgery.convert_to_cmoe first")
    return info


def cmoe_layers(model: nn.Module) -> dict[int, CMoELayer]:
    """The model's CMoE layers keyed by decoder layer index, in order."""
    layers = {m.layer_index: m for m in model.modules() if isinstance(m, CMoELayer)}
    return dict(sorted(layers.items()))


def add_task(model: nn.Module, name: str) -> int:
    """Start task `name`: freeze every existing expert and router, give it a router; its index."""
    info = cmoe_info(model)
    if not _TASK_NAME.match(name):
        raise ValueError(f"task name {name!r}: use 1-64 letters, digits, '_' or '-' (it names a folder)")
    if name in info.tasks or name == BASE:
        raise ValueError(f"task {name!r} already exists (tasks: {info.tasks})")
    for layer in cmoe_layers(model).values():
        layer._no_probe("add a task")
        if info.single_router and len(layer.routers):
            layer.experts.requires_grad_(False)  # the shared router keeps training, experts do not
        else:
            layer.freeze()
            layer.add_router()
    info.tasks.append(name)
    return len(info.tasks) - 1


def restart_router(model: nn.Module, source: str) -> None:
    """Start the current task, in every CMoE layer, from task `source` (BASE: the base): a copy of its
    router, and the delta it runs with, inherited [5b, 8]."""
    info = cmoe_info(model)
    if source != BASE and source not in info.tasks[:-1]:
        raise ValueError(f"no earlier task {source!r} to start a router from (tasks: {info.tasks[:-1]})")
    for layer in cmoe_layers(model).values():
        layer.restart_router(None if source == BASE else info.tasks.index(source))
        layer.inherit_delta(None if source == BASE else info.tasks.index(source))


def add_expert(model: nn.Module, layer: int, init: ExpertInit = "copy", source: int = 0) -> int:
    """Give CMoE layer `layer` a new expert owned by the current task; returns the expert's index."""
    return _layer(model, layer).add_expert(cmoe_info(model).current_task, init, source)


def add_delta(model: nn.Module, layer: int, rank: int) -> int:
    """Give the current task a rank-`rank` change of CMoE layer `layer`'s base experts; its parameter count."""
    cmoe_info(model).current_task  # noqa: B018 - a clear error when no task was started
    return _layer(model, layer).add_delta(rank)


def retirable(model: nn.Module, task: str) -> int:
    """The index of `task`, if the model can retire it; ValueError saying why not otherwise."""
    info = cmoe_info(model)
    if info.single_router:
        raise ValueError("a single-router model cannot retire a task: its one router learned every task")
    if task not in info.tasks:
        raise ValueError(f"task {task!r} is not in this model (tasks: {info.tasks})")
    if len(info.tasks) == 1:
        raise ValueError(f"task {task!r} is the model's only task: retiring it would leave no task")
    return info.tasks.index(task)


def retire_task(model: nn.Module, task: str, drop: set[tuple[int, int]]) -> str | None:
    """Forget task `task`: its router, locator VAE and record, and its experts `drop` ((layer, expert) pairs).

    Its other experts stay, frozen, owned by the next task (returned; None when `task` is the last
    one, whose experts must then all be in `drop`). Everything is checked before anything changes.
    """
    info = cmoe_info(model)
    t = retirable(model, task)
    heir = info.tasks[t + 1] if t + 1 < len(info.tasks) else None
    layers = cmoe_layers(model)
    if unknown := sorted(i for i, _ in drop if i not in layers):
        raise ValueError(f"decoder layers {unknown} are not CMoE layers (CMoE layers: {list(layers)})")
    per_layer = {i: {e for j, e in drop if j == i} for i in layers}
    for i, layer in layers.items():  # every layer first: a refusal leaves the model as it was
        layer.check_retire(task, per_layer[i], heir)
    for i, layer in layers.items():
        layer.retire(t, task, per_layer[i], heir)
    info.tasks.remove(task)
    info.task_records.pop(task, None)
    if task in info.locator.vaes:
        del info.locator.vaes[task]
    return heir


def train_all_experts(model: nn.Module) -> None:
    """Let every expert of every CMoE layer train (the seq-ft and joint baselines), in fp32 whatever the
    base's dtype, as every trained expert."""
    for layer in cmoe_layers(model).values():
        layer.experts.float().requires_grad_(True)


def trainable_parameters(model: nn.Module, task: str | None = None) -> list[nn.Parameter]:
    """Exactly what task `task` (default: the current one) trains: its new experts, probes, router.

    Pass only these to the optimizer: AdamW's weight decay would otherwise move frozen tensors.
    """
    info = cmoe_info(model)
    task = task or info.current_task
    if task != info.current_task:
        raise ValueError(f"task {task!r} is frozen; only the current task {info.current_task!r} trains")
    params: list[nn.Parameter] = []
    for layer in cmoe_layers(model).values():
        for origin, expert in zip(layer.expert_origin, layer.experts):
            if origin == task:
                params += expert.parameters()
        if layer.probe is not None:
            params += layer.probe.parameters()
        if not info.single_router:
            params += layer.deltas[-1].parameters()
        params.append(layer.routers[-1])
    return params


@contextmanager
def balance_scope(
    model: nn.Module, attention_mask: torch.Tensor | None, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Iterator[None]:
    """Forwards inside count only `attention_mask` tokens for load balancing, summed over ranks by `reduce_sum`."""
    state = cmoe_info(model).routing
    previous = state.token_mask, state.reduce_sum
    state.token_mask = None if attention_mask is None else attention_mask.bool()
    state.reduce_sum = reduce_sum
    try:
        yield
    finally:
        state.token_mask, state.reduce_sum = previous


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The weighted load-balancing loss of the last forward, summed over CMoE layers (add to LM loss)."""
    info = cmoe_info(model)
    losses = [layer.aux_loss for layer in cmoe_layers(model).values() if layer.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return info.aux_loss_coef * torch.stack(losses).sum()


@contextmanager
def record_routing(model: nn.Module) -> Iterator[None]:
    """Count, per layer, tokens, top-k assignments and router mass of the forwards run inside."""
    layers = cmoe_layers(model).values()
    for layer in layers:
        n = len(layer._active_experts())
        layer.stats = {"tokens": torch.zeros((), dtype=torch.long),
                       "topk_counts": torch.zeros(n, dtype=torch.long), "prob_sum": torch.zeros(n)}
        layer.recording = True
    try:
        yield
    finally:
        for layer in layers:  # the counts stay readable until the next record_routing
            layer.recording = False


def expert_usage(model: nn.Module) -> dict[int, list[int]]:
    """Per layer, how many top-k assignments each real expert got inside the last `record_routing`."""
    usage = {}
    for i, layer in cmoe_layers(model).items():
        if layer.stats is None:
            raise RuntimeError(f"CMoE layer {i}: no routing recorded; run forwards inside record_routing(model)")
        usage[i] = layer.stats["topk_counts"][: len(layer.experts)].tolist()
    return usage


def attach_probes(model: nn.Module, source: Literal["most_used"] | int = "most_used") -> None:
    """PGKE: attach a probe to every CMoE layer, a copy of its most-used expert (or of `source`) [2].

    "most_used" reads the counts of the last `record_routing` block (run the task's data through
    the new task's router first); the router snapshot lets `drop_probes` undo this exactly.
    """
    if not cmoe_info(model).tasks:
        raise RuntimeError("probes belong to a task: call add_task(model, name) first")
    usage = expert_usage(model) if source == "most_used" else None
    for i, layer in cmoe_layers(model).items():
        src = max(range(len(usage[i])), key=usage[i].__getitem__) if usage else int(source)
        layer.attach_probe(src)
        layer.stats = None  # counts were sized for the experts before the probe


def probe_scores(model: nn.Module) -> dict[int, ProbeScore]:
    """Per layer, the probe's share of top-k assignments and router mass (needs `record_routing`)."""
    return {i: layer.probe_score() for i, layer in cmoe_layers(model).items()}


def probe_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's attached probe and current router (probe column last): the expansion's warm start."""
    out = {}
    for i, layer in cmoe_layers(model).items():
        if layer.probe is None:
            raise RuntimeError(f"CMoE layer {i}: no probe attached; call attach_probes(model) first")
        out[f"{i}.router"] = layer.routers[-1].detach().contiguous()
        for k, v in layer.probe.state_dict().items():
            out[f"{i}.probe.{k}"] = v.detach().contiguous()
    return out


def delta_probe_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's current router and the current task's own delta: a delta probe's warm start [5b]."""
    out = {}
    for i, layer in cmoe_layers(model).items():
        if not layer.deltas[-1]:
            raise RuntimeError(f"CMoE layer {i}: the current task has no delta of its own; call add_delta first")
        out[f"{i}.router"] = layer.routers[-1].detach().contiguous()
        out |= {f"{i}.delta.{k}": v.detach().contiguous() for k, v in layer.deltas[-1].state_dict().items()}
    return out


def load_delta_probe_state(model: nn.Module, tensors: dict[str, torch.Tensor], rank: int, with_delta: bool) -> None:
    """Start the current task where its delta probe ended (`delta_probe_state`): its router, and, with
    `with_delta`, its own rank-`rank` delta in every layer."""
    for i, layer in cmoe_layers(model).items():
        router = tensors.get(f"{i}.router")
        if router is None or router.shape != layer.routers[-1].shape:
            got = "missing" if router is None else tuple(router.shape)
            raise ValueError(f"probe state: layer {i} router is {got}, the model's is {tuple(layer.routers[-1].shape)}")
        with torch.no_grad():
            layer.routers[-1].copy_(router)
        if with_delta:
            layer.add_delta(rank)
            prefix = f"{i}.delta."
            layer.deltas[-1].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def load_probe_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Attach probes as `probe_state` saved them: each layer's trained probe and router, probe column included."""
    layers = cmoe_layers(model)
    saved = {int(k.split(".", 1)[0]) for k in tensors}
    if saved != set(layers):
        raise ValueError(f"probe state has layers {sorted(saved)}, the model's CMoE layers are {list(layers)}")
    attach_probes(model, source=0)  # the probes' shape; their weights come from `tensors`
    for i, layer in layers.items():
        router = tensors.get(f"{i}.router")
        if router is None or router.shape != layer.routers[-1].shape:
            got = "missing" if router is None else tuple(router.shape)
            raise ValueError(f"probe state: layer {i} router is {got}, the model's is {tuple(layer.routers[-1].shape)}")
        prefix = f"{i}.probe."
        layer.probe.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        with torch.no_grad():
            layer.routers[-1].copy_(router)


def drop_probes(model: nn.Module, keep_router: bool = False) -> None:
    """Remove every remaining probe; each layer returns exactly to its pre-probe state.

    With `keep_router` the router keeps the columns it trained beside the probe for the existing
    experts (the warm start of a layer the expansion leaves unexpanded).
    """
    for layer in cmoe_layers(model).values():
        trained = layer.routers[-1].detach()[:-1].clone() if keep_router and layer.probe is not None else None
        layer.drop_probe()
        if trained is not None:
            with torch.no_grad():
                layer.routers[-1].copy_(trained)


def promote_probe(model: nn.Module, layer: int) -> int:
    """Keep layer `layer`'s trained probe as a new expert of the current task; its index."""
    return _layer(model, layer).promote_probe(cmoe_info(model).current_task)


def _layer(model: nn.Module, index: int) -> CMoELayer:
    layers = cmoe_layers(model)
    if index not in layers:
        raise KeyError(f"decoder layer {index} is not a CMoE layer (CMoE layers: {list(layers)})")
    return layers[index]
