"""fwd+bwd time of a CMoE layer vs a dense MLP of equal active parameters: `python -m benchmarks.moe_layer`.

"Equal active parameters": a token of a top-k CMoE layer passes through k experts of
intermediate width I, i.e. 3·d·k·I weights (+ a d·E router); the dense reference is one gated MLP of
width k·I, i.e. the same 3·d·k·I weights and the same FLOPs. Everything trains (all experts, the
router, the input's gradient), so the backward pass is complete on both sides. The variants run
interleaved in one process, after warm-up; the table shows medians. "stacked" is the alternative
expert storage (one (E, d, 2I) and one (E, I, d) tensor, `torch.nn.functional.grouped_mm`) behind
the same routing and dispatch: the measurement behind the choice of per-expert modules in
cmoe/model/cmoe_layer.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from cmoe.model.cmoe_layer import CMoELayer, RoutingState, dispatch, topk_route

SIZES = {  # name: (hidden, expert intermediate, batch, seq)
    "tiny-default": (128, 256, 32, 60),  # the embedded tiny base: 64 px images (17 tokens) + prompt
    "bigger": (512, 1024, 16, 128),
}


def _mlp(hidden: int, intermediate: int) -> LlamaMLP:
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))


def build(hidden: int, intermediate: int, experts: int, top_k: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The three modules under test, all parameters trainable: dense (width k·I), cmoe, stacked."""
    torch.manual_seed(0)
    dense = _mlp(hidden, top_k * intermediate)
    routing = RoutingState()
    moe = CMoELayer(_mlp(hidden, intermediate), hidden, experts, top_k, 0, routing)
    moe.add_router()
    moe.requires_grad_(True)
    routing.task_ids = torch.zeros(1, dtype=torch.long)  # one task: the batch is repeated over it
    gate_up = nn.Parameter(torch.randn(experts, hidden, 2 * intermediate) * 0.02)
    down = nn.Parameter(torch.randn(experts, intermediate, hidden) * 0.02)

    def grouped(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        g, u = F.grouped_mm(rows, gate_up, offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(g) * u, down, offs=offsets)

    def stacked(x: torch.Tensor) -> torch.Tensor:  # the CMoE layer's routing and dispatch, stacked experts
        flat = x.reshape(-1, hidden)
        gates, idx, _ = topk_route(F.linear(flat, moe.routers[0]), top_k)
        return dispatch(flat, idx, gates, experts, grouped).view_as(x)

    return {"dense": dense, "cmoe": moe, "stacked": stacked}


def time_fwd_bwd(fns: dict[str, Callable], x: torch.Tensor, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of forward + backward per variant, variants interleaved to share CPU noise."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            inp = x.detach().clone().requires_grad_(True)
            start = time.perf_counter()
            fn(inp).square().mean().backward()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    """Print one table row per size: median ms per variant and the cmoe / dense ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, E={args.experts}, top-{args.top_k}, "
          f"median of {args.repeats}")
    print(f"{'size':<13} {'d':>4} {'I':>5} {'tokens':>6} {'dense ms':>9} {'cmoe ms':>8} {'stacked ms':>10} "
          f"{'cmoe/dense':>10} {'stacked/dense':>13}")
    for name in args.sizes:
        hidden, inter, batch, seq = SIZES[name]
        fns = build(hidden, inter, args.experts, args.top_k)
        t = time_fwd_bwd(fns, torch.randn(batch, seq, hidden), args.repeats)
        print(f"{name:<13} {hidden:>4} {inter:>5} {batch * seq:>6} {t['dense'] * 1e3:>9.2f} {t['cmoe'] * 1e3:>8.2f} "
              f"{t['stacked'] * 1e3:>10.2f} {t['cmoe'] / t['dense']:>10.2f} {t['stacked'] / t['dense']:>13.2f}")


if __name__ == "__main__":
    main()
