"""The base's MoE stage (MoE-LLaVA's third stage): upcycle the pretrained MLPs, train the experts and a base router.

Upcycled experts start as E0 copies of one dense MLP, so routing among them would choose between
identical functions. Here they train, with one shared base router and the load-balancing loss, on
the pretraining corpus (everything else frozen), so they differ before any continual task; every
task's router then starts from the base router (docs/method.md, choices 1 and 8). The diagnostics
say whether it worked: per layer, each expert's share of the top-k assignments and the pairwise
cosine similarity of the experts' outputs on held-out tokens (1.0 = still copies).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.config import BaseModelConfig, MoEConfig
from cmoe.model.cmoe_layer import CMoELayer, cmoe_layers, topk_route
from cmoe.model.inference import device_of
from cmoe.model.processor import Encoded, VLProcessor
from cmoe.model.routing import route
from cmoe.model.surgery import convert_to_cmoe
from cmoe.stages.common import moe_loss
from cmoe.stages.trainer import TrainSpec, train

MAX_TOKENS = 4096  # held-out tokens per layer for the diagnostics: plenty for a share or a mean cosine


def run_moe_stage(
    model: nn.Module, processor: VLProcessor, data: list[Encoded], heldout: list[Encoded], base: BaseModelConfig,
    moe: MoEConfig,
) -> dict:
    """Upcycle the dense `model` in place (one base router) and train experts + router on `data`; the stage's log."""
    convert_to_cmoe(model, moe, single_router=True)
    layers = cmoe_layers(model).values()
    torch.manual_seed(base.seed)  # the base router's random start
    for layer in layers:
        layer.add_router()  # router 0: the base router, shared by every token
        layer.experts.requires_grad_(True)
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    spec = TrainSpec(epochs=base.moe_epochs, batch_size=base.pretrain_batch_size, lr=base.moe_lr, seed=base.seed,
                     desc="moe stage")
    with route(model, None):
        model.train()
        result = train(model, params, data, processor.collate, moe_loss, spec)
        model.eval()
    model.requires_grad_(False)
    return {"train": asdict(result), **expert_diagnostics(model, processor, heldout, base.pretrain_batch_size)}


@torch.no_grad()
def expert_diagnostics(model: nn.Module, processor: VLProcessor, examples: list[Encoded], batch_size: int) -> dict:
    """Per CMoE layer, on the non-padding tokens of `examples` under router 0: expert utilisation and similarity."""
    layers = cmoe_layers(model)
    inputs = _layer_inputs(model, processor, examples, batch_size)
    utilisation, similarity = {}, {}
    for i, layer in layers.items():
        x = inputs[i]
        _, idx, _ = topk_route(F.linear(x.float(), layer.routers[0].float()), layer.top_k)
        counts = torch.bincount(idx.reshape(-1), minlength=len(layer.experts))
        utilisation[str(i)] = [round(float(c) / idx.numel(), 4) for c in counts]
        similarity[str(i)] = output_similarity(layer, x)
    off_diagonal = [s["mean_pairwise"] for s in similarity.values()]
    return {"tokens": min(len(v) for v in inputs.values()), "utilisation": utilisation, "similarity": similarity,
            "mean_pairwise_similarity": sum(off_diagonal) / len(off_diagonal)}


def output_similarity(layer: CMoELayer, x: torch.Tensor) -> dict:
    """Mean per-token cosine similarity of every pair of the layer's experts on inputs `x` (N, d)."""
    outs = F.normalize(torch.stack([expert(x).float() for expert in layer.experts]), dim=-1)  # (E, N, d)
    matrix = torch.einsum("and,bnd->ab", outs, outs) / x.shape[0]
    n = len(layer.experts)
    pairs = [float(matrix[a, b]) for a in range(n) for b in range(a + 1, n)]
    return {"matrix": [[round(float(v), 4) for v in row] for row in matrix],
            "mean_pairwise": sum(pairs) / len(pairs) if pairs else 1.0}


def _layer_inputs(model: nn.Module, processor: VLProcessor, examples: list[Encoded], batch_size: int) -> dict[int, torch.Tensor]:
    """Each CMoE layer's input hidden states at the non-padding positions of `examples` (at most MAX_TOKENS)."""
    layers = cmoe_layers(model)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    mask: dict[str, torch.Tensor] = {}

    def hook(i: int):  # noqa: ANN202 - a forward pre-hook factory
        return lambda module, args: captured[i].append(args[0][mask["keep"]].detach())

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in layers.items()]
    try:
        for start in range(0, len(examples), batch_size):
            if sum(len(t) for t in captured[next(iter(layers))]) >= MAX_TOKENS:
                break
            batch = processor.collate(examples[start:start + batch_size], device=device_of(model))
            mask["keep"] = batch["attention_mask"].bool()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(chunks)[:MAX_TOKENS] for i, chunks in captured.items()}
