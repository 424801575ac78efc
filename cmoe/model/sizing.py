"""Sizing before spending: what each stage needs (parameters, memory, GPUs), computed without training.

The model is built on PyTorch's meta device (shapes, no storage) and grown with the very calls the
stages make (`convert_to_cmoe`, `add_task`, `attach_probes`, `add_expert`, `count_params`), so the
parameter counts are the stages' own, not formulas that could drift from them; what trains is what
requires grad, as the trainer checks. Weights cost their dtype's bytes (a bf16 base, `base.dtype`, halves
the frozen ones; what trains is fp32 by construction, cmoe.model.cmoe_layer). Memory per GPU is bytes per parameter by precision and ZeRO stage, plus an estimate of what
the forward keeps for the backward (`_layer_bytes`, or with `expand.gradient_checkpointing` the
layers' inputs and one layer's share, `_checkpointed_bytes`); the smallest setup is the fewest GPUs of a size
whose per-GPU total fits under `HEADROOM` of its memory. Parameters and optimizer state are exact
(tests/model/test_sizing.py checks them against a real optimizer step); activations are an estimate,
checked against measured peaks by `benchmarks/gpu_check.sh` when a GPU runs it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from cmoe.config import CmoeConfig, ProbeConfig
from cmoe.model.base import SUPPORTED_TEXT_MODELS, tiny_llava_config
from cmoe.model.cmoe_layer import add_expert, add_task, attach_probes, cmoe_layers, drop_probes
from cmoe.model.params import count_params
from cmoe.model.surgery import convert_to_cmoe, decoder_layers, text_model

GiB = 2**30
# Memory a GPU of each class offers (the 141 GB H200 reports ~139 GiB), and the share a plan may fill:
# the rest is CUDA context, NCCL and ZeRO buffers, the allocator's fragmentation.
GPUS = {"80 GB": int(79.6 * GiB), "141 GB": int(139 * GiB)}
HEADROOM = 0.9
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)  # one GPU, one node of 2/4/8, up to 8 nodes of 8
ADAM_BYTES = 8  # AdamW's two fp32 moments per trainable parameter


class SizingError(ValueError):
    """A base config that cannot be sized; the message names the file and the field."""


@dataclass(frozen=True)
class Precision:
    """How a DeepSpeed config stores and computes: bytes per weight, gradient, activation."""

    name: str
    weight_bytes: int  # per parameter, as the module holds it
    grad_bytes: int
    compute_bytes: int  # per activation element
    # torch autocast casts each fp32 weight to bf16 per forward; a frozen weight's copy is not cached but
    # kept by the graph for the input gradient, so every weight the backward passes costs 2 bytes more.
    weight_copies: bool


@dataclass(frozen=True)
class TrainingSetup:
    """What a DeepSpeed JSON (infra/deepspeed/) decides for the memory: ZeRO stage, precision, accumulation."""

    source: str
    zero_stage: int
    precision: Precision
    grad_accum: int = 1


def training_setup(ds: dict, source: str) -> TrainingSetup:
    """Read the ZeRO stage, precision and gradient accumulation of a DeepSpeed config dict."""
    if ds.get("bf16", {}).get("enabled"):
        precision = Precision("bf16 weights, fp32 master", 2, 2, 2, False)
    elif ds.get("torch_autocast", {}).get("enabled"):
        precision = Precision("bf16 autocast, fp32 weights", 4, 4, 2, True)
    else:
        precision = Precision("fp32", 4, 4, 4, False)
    return TrainingSetup(source, int(ds.get("zero_optimization", {}).get("stage", 0)), precision,
                         int(ds.get("gradient_accumulation_steps", 1)))


@dataclass(frozen=True)
class StagePlan:
    """One stage's figures, the global batch's; `per_gpu` splits them over data-parallel ranks."""

    stage: str
    batch_size: int  # global batch (training) or evaluation batch
    seq_len: int  # tokens per sample: image tokens + text (+ generated tokens when evaluating)
    params_total: int
    trainable: int
    weights_bytes: int
    weight_copies_bytes: int  # bf16 copies of the weights the backward needs (autocast only)
    grads_bytes: int  # unpartitioned
    optimizer_bytes: int  # unpartitioned: AdamW moments (+ fp32 master partition under ZeRO or bf16 weights)
    activation_bytes_per_sample: int  # kept for the backward (training) or KV cache + working set (evaluation)
    setup: TrainingSetup | None  # None: no training (evaluation)
    # Only the expansion is launched over ranks (expand.nproc_per_node, expand.hostfile); the other
    # stages run in the calling process, on one GPU.
    distributed: bool = False

    def per_gpu(self, world: int, accum: int | None = None) -> dict[str, int] | None:
        """Bytes on each of `world` ranks by kind, with `accum` micro-steps per step (default: the
        DeepSpeed config's); None when the stage does not run on `world` ranks that way."""
        accum = accum or (self.setup.grad_accum if self.setup else 1)
        if self.batch_size % (world * accum) or (world > 1 and not self.distributed):
            return None
        zero = self.setup.zero_stage if self.setup else 0
        return {
            "weights": self.weights_bytes + self.weight_copies_bytes,
            "gradients": self.grads_bytes // (world if zero >= 2 else 1),
            "optimizer": self.optimizer_bytes // (world if zero >= 1 else 1),
            "activations": self.activation_bytes_per_sample * (self.batch_size // (world * accum)),
        }

    def smallest(self, capacity: int) -> tuple[int, int] | None:
        """The fewest GPUs of `capacity` bytes the stage fits on, and the gradient accumulation it then
        needs (the config's, doubled until the micro-batch fits); None: not within WORLD_SIZES."""
        base = self.setup.grad_accum if self.setup else 1
        for world in WORLD_SIZES if self.distributed else (1,):
            accum = base
            while (need := self.per_gpu(world, accum)) is not None:
                if sum(need.values()) <= HEADROOM * capacity:
                    return world, accum
                if self.setup is None:
                    break  # evaluation: no accumulation to trade memory for
                accum *= 2
        return None


@dataclass(frozen=True)
class ResourcePlan:
    """Every stage's plan for one base shape and one cmoe config."""

    source: str  # the base folder, or the config's `base` section
    shape: dict[str, int | str]
    image_tokens: int
    text_tokens: int
    per_expert: int  # parameters one added expert brings
    experts_per_task: int  # the most experts one task may add (probe.max_layer_share, double_expert_ratio)
    base_dtype: str = "float32"  # how the stages load the frozen base (base.dtype)
    gradient_checkpointing: bool = False  # the probe's and the expansion's (expand.gradient_checkpointing)
    stages: list[StagePlan] = field(default_factory=list)


def read_base_config(path: str | Path) -> LlavaConfig:
    """The LLaVA config of a base folder's config.json (no weights needed), as transformers would build it."""
    cfg_file = Path(path) / "config.json"
    try:
        data = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise SizingError(f"{cfg_file}: not found (pass a Hugging Face LLaVA checkpoint folder)") from None
    except json.JSONDecodeError as err:
        raise SizingError(f"{cfg_file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SizingError(f"{cfg_file}: top level must be an object")
    if data.get("model_type") != "llava":
        raise SizingError(f"{cfg_file}: model_type is {data.get('model_type')!r}; cmoe sizes LLaVA-style "
                          "checkpoints (model_type 'llava')")
    # transformers fills a missing sub-config with LLaVA-7B's defaults: a guess, so these are required.
    for section in ("text_config", "vision_config"):
        if not isinstance(data.get(section), dict):
            raise SizingError(f"{cfg_file}: {section} missing (the {section.split('_')[0]} model's shape)")
        if "model_type" not in data[section]:
            raise SizingError(f"{cfg_file}: {section}.model_type missing")
    text_type = data["text_config"]["model_type"]
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise SizingError(f"{cfg_file}: text_config.model_type {text_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_TEXT_MODELS)})")
    try:
        return LlavaConfig(**{k: v for k, v in data.items() if k != "model_type"})
    except (TypeError, ValueError, KeyError) as err:
        raise SizingError(f"{cfg_file}: {err}") from None


def image_tokens(config: LlavaConfig) -> int:
    """Image tokens per sample: the tower's patches, +1 for CLS under the "full" feature strategy."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")


def plan_resources(
    config: LlavaConfig | None, cfg: CmoeConfig, setup: TrainingSetup, base_setup: TrainingSetup | None = None,
    *, text_tokens: int = 64, learned_tasks: int = 0, source: str = "config base section",
) -> ResourcePlan:
    """Plan the probe, expansion and evaluation of the next task (after `learned_tasks` grown ones) on
    the base `config` (None: the tiny default of `cfg.base`); with `base_setup`, the base build too."""
    config = config if config is not None else tiny_llava_config(cfg.base)
    tc = config.text_config
    n_img = image_tokens(config)
    seq = n_img + text_tokens
    model = _meta_model(config, getattr(torch, cfg.base.dtype))  # as open_lineage loads it
    shape = {"text": tc.model_type, "text_hidden": tc.hidden_size, "text_layers": tc.num_hidden_layers,
             "text_intermediate": tc.intermediate_size, "text_heads": tc.num_attention_heads,
             "kv_heads": _kv_heads(tc), "vocab": tc.vocab_size, "vision_hidden": config.vision_config.hidden_size,
             "vision_layers": config.vision_config.num_hidden_layers, "image_size": config.vision_config.image_size,
             "patch_size": config.vision_config.patch_size, "dense_params": _numel(model)}
    stages: list[StagePlan] = []
    if base_setup is not None:
        stages += _base_stages(config, cfg, base_setup, seq)

    convert_to_cmoe(model, cfg.moe)
    layers = cmoe_layers(model)
    per_expert = _numel(next(iter(layers.values())).experts[0])
    for t in range(learned_tasks):  # each earlier task grew the most a plan allows; all of it frozen now
        add_task(model, f"task{t}")
        grow_most(model, cfg.probe)
        model.requires_grad_(False)
    add_task(model, "next")
    attach_probes(model, source=0)  # the probe phase trains more than the router-only phase before it
    checkpointed = cfg.expand.gradient_checkpointing
    stages.append(_train_stage("probe", model, cfg.probe.batch_size, seq, setup, cfg.moe.top_k,
                               checkpointed=checkpointed))
    drop_probes(model)
    added = grow_most(model, cfg.probe)
    stages.append(replace(_train_stage("expansion", model, cfg.expand.batch_size, seq, setup, cfg.moe.top_k,
                                       checkpointed=checkpointed), distributed=True))
    stages.append(_eval_stage(model, cfg, seq))
    return ResourcePlan(source, shape, n_img, text_tokens, per_expert, added, cfg.base.dtype, checkpointed, stages)


def grow_most(model: nn.Module, probe: ProbeConfig) -> int:
    """Grow the current task as much as a PGKE plan may (`probe.max_layer_share` of the CMoE layers, 1
    expert each, 2 with `double_expert_ratio`; all layers' experts are the same size); experts added."""
    layers = list(cmoe_layers(model))
    per_layer = 1 if probe.double_expert_ratio is None else 2
    chosen = layers[: max(1, math.floor(probe.max_layer_share * len(layers)))]
    for i in chosen:
        for _ in range(per_layer):
            add_expert(model, i, init="copy")
    return len(chosen) * per_layer


def model_flops_per_sample(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs one training sample costs: the forward of the vision tower and the text model, and
    the text model's input-gradient backward (as much again); the weight gradients of the few trainable
    tensors are left out, so an MFU from this is slightly low. Attention counts the full s x s (PaLM)."""
    config = model.config
    tc = config.text_config
    counts = count_params(model)
    text = text_model(model)
    text_ids = {id(p) for m in (text, model.get_output_embeddings()) for p in m.parameters()}  # tied or not
    vision = sum(p.numel() for p in model.parameters() if id(p) not in text_ids)  # tower + projector
    text_matmul = counts.active_per_token - vision - _numel(text.embed_tokens)
    forward = 2 * text_matmul * seq_len + 4 * tc.num_hidden_layers * seq_len**2 * tc.hidden_size
    return 2 * forward + 2 * vision * image_tokens(config)


# ------------------------------------------------------------------------------------------ stages
def _base_stages(config: LlavaConfig, cfg: CmoeConfig, setup: TrainingSetup, seq: int) -> list[StagePlan]:
    """The tiny base's build: pretraining trains every parameter, the MoE stage its upcycled experts and router."""
    bc = cfg.base
    dense = _meta_model(config)  # built and trained in fp32 whatever base.dtype (it says how stages load it)
    dense.requires_grad_(True)
    pretrain = _train_stage("base pretrain", dense, bc.pretrain_batch_size, seq, setup, 1, everything=True)
    moe = _meta_model(config)
    convert_to_cmoe(moe, cfg.moe, single_router=True)
    for layer in cmoe_layers(moe).values():  # as cmoe.stages.moe_stage.run_moe_stage trains them
        layer.add_router()
        layer.experts.requires_grad_(True)
    return [pretrain, _train_stage("base moe stage", moe, bc.pretrain_batch_size, seq, setup, cfg.moe.top_k)]


def _train_stage(name: str, model: nn.Module, batch: int, seq: int, setup: TrainingSetup, top_k: int,
                 everything: bool = False, checkpointed: bool = False) -> StagePlan:
    """A training stage of `model` as it stands: its requires_grad tensors train; `checkpointed`: its
    text decoder under gradient checkpointing."""
    p = setup.precision
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    master = 4 if setup.zero_stage >= 1 or p.weight_bytes < 4 else 0  # ZeRO-1/2 keep an fp32 partition
    # the residual stream is in the base's dtype (autocast computes lower, but adds in the weights' dtype)
    stream = min(p.weight_bytes, _base_bytes(model))
    c = min(p.compute_bytes, stream)
    layers = decoder_layers(model)
    moe = cmoe_layers(model)
    first = 0 if everything else min(moe)  # no gradient flows below the lowest trainable layer
    tc = model.config.text_config
    d, kv, inter = tc.hidden_size, _kv_heads(tc) * _head_dim(tc), tc.intermediate_size
    per_layer = [_layer_bytes(d, kv, inter, top_k if i in moe else 1, i in moe, everything, c)
                 for i in range(first, len(layers))]
    per_token = _checkpointed_bytes(per_layer, d, stream) if checkpointed else sum(per_layer)
    per_token += _logits_bytes(tc.vocab_size, c)
    per_sample = per_token * seq
    backward = [t for layer in list(layers)[first:] for t in layer.parameters()]
    backward += list(model.get_output_embeddings().parameters())
    if everything:  # the vision tower trains too: its layers keep their activations, its weights their copies
        vc = model.config.vision_config
        n_img = image_tokens(model.config)
        per_sample += n_img * vc.num_hidden_layers * _layer_bytes(
            vc.hidden_size, vc.hidden_size, vc.intermediate_size, 1, False, True, c)
        backward = list(model.parameters())
    # autocast's bf16 copy, for the backward, of every fp32 weight the backward passes (a bf16 one is used as it is)
    copies = sum(t.numel() for t in backward if t.dtype == torch.float32) * p.compute_bytes if p.weight_copies else 0
    return StagePlan(name, batch, seq, _numel(model), trainable, _weights_bytes(model, p), copies,
                     trainable * p.grad_bytes, trainable * (ADAM_BYTES + master), per_sample, setup)


def _eval_stage(model: nn.Module, cfg: CmoeConfig, seq: int) -> StagePlan:
    """Batched greedy decoding without autocast, in the base's dtype: weights (trained experts in fp32),
    the KV cache, one layer's working set and the last logits."""
    tc = model.config.text_config
    d, kv, inter, k = tc.hidden_size, _kv_heads(tc) * _head_dim(tc), tc.intermediate_size, cfg.moe.top_k
    total_seq = seq + cfg.eval.max_new_tokens
    c = _base_bytes(model)
    kv_cache = 2 * tc.num_hidden_layers * kv * total_seq * c
    working = seq * (3 * d + 2 * kv + 3 * k * inter) * c + 2 * tc.vocab_size * c
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    return StagePlan("evaluation", cfg.eval.batch_size, total_seq, _numel(model), 0, weights, 0, 0, 0,
                     kv_cache + working, None)


def _layer_bytes(d: int, kv: int, inter: int, experts: int, moe: bool, trains_weights: bool, c: int) -> int:
    """Bytes one decoder layer keeps per token for the backward (an estimate, SDPA attention: no s x s).

    Always: q, k, v and the attention output; per expert a token passes, the gated MLP's gate, up and
    activation outputs; RMSNorm's two inputs, upcast to fp32 (Hugging Face). A CMoE layer adds the
    experts' outputs (the gates' gradient) and the router's fp32 input. Linears whose weights train
    also keep their inputs.
    """
    elements = 2 * d + 2 * kv + 3 * inter * experts
    fp32 = 2 * 4 * d
    if moe:
        elements += experts * d
        fp32 += 4 * d
    if trains_weights:
        elements += 2 * d + experts * (d + inter)
    return elements * c + fp32


def _weights_bytes(model: nn.Module, p: Precision) -> int:
    """Bytes of `model`'s weights as training holds them: DeepSpeed's bf16 mode casts the whole module,
    otherwise each weight stays in the dtype it was loaded (the base) or created in (fp32 experts, routers)."""
    if p.weight_bytes < 4:
        return _numel(model) * p.weight_bytes
    return sum(t.numel() * t.element_size() for t in model.parameters())


def _checkpointed_bytes(per_layer: list[int], d: int, stream: int) -> int:
    """Bytes per token a checkpointed decoder keeps: every layer's input (the residual stream, d values of
    `stream` bytes) until the backward reaches it, plus, while the backward recomputes a layer, that
    layer's activations (the largest layer's, `per_layer`: what `_layer_bytes` says each would keep):
    sum_l d * stream + max_l layer_bytes(l)."""
    return len(per_layer) * d * stream + max(per_layer)


def _logits_bytes(vocab: int, c: int) -> int:
    """Per token: the logits, their fp32 upcast for the loss (when computed lower), the saved log-softmax."""
    return vocab * (c + 4 + (4 if c < 4 else 0))


# ------------------------------------------------------------------------------------------ helpers
def _meta_model(config: LlavaConfig, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """The LLaVA model of `config` in `dtype`, with shapes and no storage: a 7 B model costs no memory
    and no init time."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config).to(dtype)


def _base_bytes(model: nn.Module) -> int:
    """Bytes per element of the base's dtype (its input embeddings': the frozen base's)."""
    return model.get_input_embeddings().weight.element_size()


def _numel(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _kv_heads(tc) -> int:  # noqa: ANN001 - any HF text config
    return getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads


def _head_dim(tc) -> int:  # noqa: ANN001 - any HF text config
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads

