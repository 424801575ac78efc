"""The GPU check: real shapes, random weights, the real trainer: `bash benchmarks/gpu_check.sh`.

On a CUDA machine, two shapes: about 0.5 B (Qwen2-0.5B's text model with a CLIP-B/16 tower) and
LLaVA-1.5-7B (examples/llava-1.5-7b: Llama-2-7B text, CLIP-L/14 at 336 px), each built with random
weights on the GPU and upcycled with the MoE layout of examples/llava-1.5-7b/cmoe.yaml. Then, per
shape: probe steps (the task router and a probe expert in every CMoE layer) and expansion steps
(the most experts a plan may add) through `cmoe.stages.trainer` with ZeRO-2 bf16; a batched
greedy evaluation; and the CMoE-vs-dense layer of `benchmarks/moe_layer.py` at the shape's width.
Printed: samples/s, tokens/s, peak GPU memory beside the plan's (`cmoe.model.sizing`), the
expansion's model FLOPs utilisation and the CMoE/dense ratio. The batch is the largest the plan
fits on this GPU (at most the config's). Without CUDA: the tiny shape on the CPU, a couple of
steps, and a line saying the GPU shapes were skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

from cmoe.env import apply_defaults

apply_defaults()  # offline Hugging Face, as every cmoe entry point

import torch  # noqa: E402
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config  # noqa: E402

from benchmarks.moe_layer import build, time_fwd_bwd  # noqa: E402
from cmoe.config import CmoeConfig, load_config, tiny_test_config  # noqa: E402
from cmoe.model.base import tiny_llava_config  # noqa: E402
from cmoe.model.cmoe_layer import add_task, attach_probes, drop_probes, trainable_parameters  # noqa: E402
from cmoe.model.gradient_checkpointing import enable_gradient_checkpointing  # noqa: E402
from cmoe.model.processor import IGNORE  # noqa: E402
from cmoe.model.routing import route  # noqa: E402
from cmoe.model.sizing import (  # noqa: E402
    HEADROOM, StagePlan, grow_most, image_tokens, model_flops_per_sample, plan_resources, read_base_config,
    training_setup,
)
from cmoe.model.surgery import convert_to_cmoe  # noqa: E402
from cmoe.stages.common import moe_loss  # noqa: E402
from cmoe.stages.trainer import TrainResult, TrainSpec, resolve_config, train  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llava-1.5-7b"
TEXT_TOKENS = 64  # question + answer, as `cmoe plan-resources` assumes
ANSWER_TOKENS = 8  # supervised tokens at the end of each sample
DEEPSPEED = "zero2"  # ZeRO-2: on a GPU infra/deepspeed/zero2_gpu_bf16.json, on the CPU its fp32 twin
# Dense bf16 peak FLOP/s by device name (NVIDIA data sheets, SXM, no sparsity): the MFU denominator.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
GiB = 2**30


def qwen2_half_b() -> LlavaConfig:
    """About 0.5 B: Qwen2-0.5B's text shape (tied embeddings) with a CLIP ViT-B/16 tower at 224 px."""
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                       tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=151646, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def shapes(device: str) -> dict[str, tuple[LlavaConfig, CmoeConfig]]:
    """Name -> (base shape, config) of the shapes this device runs."""
    if device == "cpu":
        tiny = tiny_test_config(".")
        return {"tiny": (tiny_llava_config(tiny.base), tiny)}
    cfg = load_config(EXAMPLE / "cmoe.yaml")  # the 7 B example's MoE layout, switches and batches, for both shapes
    return {"0.5b": (qwen2_half_b(), cfg), "7b": (read_base_config(EXAMPLE), cfg)}


def synthetic_rows(config: LlavaConfig, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` random samples shaped like the processor's: image tokens, text, the last tokens supervised."""
    g = torch.Generator().manual_seed(seed)
    n_img, vc = image_tokens(config), config.vision_config
    vocab = config.text_config.vocab_size
    rows = []
    for _ in range(n):
        text = torch.randint(10, min(vocab, 30000), (TEXT_TOKENS,), generator=g)  # below every special id
        ids = torch.cat([torch.full((n_img,), config.image_token_id), text])
        labels = ids.clone()
        labels[:-ANSWER_TOKENS] = IGNORE
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                     "pixel_values": torch.randn(3, vc.image_size, vc.image_size, generator=g)})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every synthetic row has the same length: a stack is the batch."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def fitting_batch(config: LlavaConfig, cfg: CmoeConfig, capacity: int | None) -> tuple[CmoeConfig, dict[str, StagePlan]]:
    """The config with the largest batches (powers of two, at most the config's) the plan fits in
    `capacity` bytes without accumulation (None: the config's), and the plan at those batches."""
    setup = training_setup(_deepspeed_json(), DEEPSPEED)
    batch = max(cfg.expand.batch_size, cfg.probe.batch_size, cfg.eval.batch_size)
    while True:
        sized = cfg.model_copy(deep=True)
        sized.probe.batch_size = min(batch, cfg.probe.batch_size)
        sized.expand.batch_size = min(batch, cfg.expand.batch_size)
        sized.eval.batch_size = min(batch, cfg.eval.batch_size)
        plan = {s.stage: s for s in plan_resources(config, sized, setup, text_tokens=TEXT_TOKENS).stages}
        if capacity is None or batch == 1 or all(sum(s.per_gpu(1, 1).values()) <= HEADROOM * capacity
                                                 for s in plan.values()):
            return sized, plan
        batch //= 2


def run_shape(name: str, config: LlavaConfig, cfg: CmoeConfig, device: str, steps: int) -> None:
    """Build `name` at random on `device`, then time its probe, expansion, evaluation and CMoE layer."""
    cuda = device == "cuda"
    capacity = torch.cuda.get_device_properties(0).total_memory if cuda else None
    cfg, plan = fitting_batch(config, cfg, capacity)
    seq = image_tokens(config) + TEXT_TOKENS
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs: a 7 B init on the CPU takes minutes
        model = LlavaForConditionalGeneration(config).to(getattr(torch, cfg.base.dtype))  # as the stages load it
    convert_to_cmoe(model, cfg.moe)
    model.requires_grad_(False)
    if cfg.expand.gradient_checkpointing:  # as the stages' open_lineage does
        enable_gradient_checkpointing(model)
    add_task(model, "check")
    print(f"[{name}] built at random on {device} in {time.perf_counter() - t0:.0f} s: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M params, MoE {cfg.moe.layers}, "
          f"E0 {cfg.moe.initial_experts}, top-{cfg.moe.top_k}, {seq} tokens per sample", flush=True)

    with route(model, ["check"]):
        attach_probes(model, source=0)
        _report(name, "probe", _train(model, cfg.probe.batch_size, steps, config), plan["probe"], seq, cuda)
        drop_probes(model)
        grow_most(model, cfg.probe)
        result = _train(model, cfg.expand.batch_size, steps, config)
        mfu = _mfu(model_flops_per_sample(model, seq) * result.samples_per_s) if cuda else None
        _report(name, "expansion", result, plan["expansion"], seq, cuda, mfu)
        _evaluate(name, model, cfg, config, plan["evaluation"], cuda)
    del model
    _free(cuda)
    _layer_ratio(name, config, cfg, cfg.expand.batch_size * seq, device)


def _train(model: torch.nn.Module, batch: int, steps: int, config: LlavaConfig) -> TrainResult:
    """One warm-up step (kernels, allocator), then `steps` timed steps of the current task's tensors."""
    rows = synthetic_rows(config, batch * steps)
    model.train()
    for n in (1, steps):
        spec = TrainSpec(steps=n, batch_size=batch, lr=1e-4, deepspeed_config=DEEPSPEED, desc="gpu check")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = train(model, trainable_parameters(model), rows, collate, moe_loss, spec)
    model.eval()
    return result


def _report(name: str, stage: str, result: TrainResult, plan: StagePlan, seq: int, cuda: bool,
            mfu: float | None = None) -> None:
    planned = sum(plan.per_gpu(1, 1).values()) / GiB
    peak = f"peak {torch.cuda.max_memory_allocated() / GiB:.1f} GiB (plan {planned:.1f} GiB)" if cuda \
        else f"plan {planned:.2f} GiB (no peak on the CPU)"
    mfu_text = "" if stage != "expansion" else (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a (no known peak FLOP/s for this device)")
    print(f"[{name}] {stage:<10} batch {plan.batch_size} x {seq} tokens, {result.steps} steps, ZeRO-2 "
          f"{'bf16' if cuda else 'fp32'}: {result.samples_per_s:.2f} samples/s, {result.samples_per_s * seq:,.0f} "
          f"tokens/s, {peak}{mfu_text}", flush=True)


@torch.no_grad()
def _evaluate(name: str, model: torch.nn.Module, cfg: CmoeConfig, config: LlavaConfig, plan: StagePlan,
              cuda: bool) -> None:
    """Batched greedy decoding of `eval.max_new_tokens` tokens (no autocast, as the stages decode), timed after a warm-up."""
    batch = collate(synthetic_rows(config, cfg.eval.batch_size, seed=1))
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}
    new = cfg.eval.max_new_tokens
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for timed in (False, True):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    n = cfg.eval.batch_size
    planned = sum(plan.per_gpu(1).values()) / GiB
    peak = f"peak {torch.cuda.max_memory_allocated() / GiB:.1f} GiB (plan {planned:.1f} GiB)" if cuda \
        else f"plan {planned:.2f} GiB"
    print(f"[{name}] evaluation batch {n}, {new} new tokens: {n / wall:.2f} samples/s, "
          f"{n * (inputs['input_ids'].shape[1] + new) / wall:,.0f} tokens/s (prompt + generated), {peak}", flush=True)


class _SyncInBackward(torch.autograd.Function):
    """Identity whose backward waits for the GPU: when the gradient reaches the layer's input, the
    layer's backward has been launched, and this makes `time_fwd_bwd`'s clock wait for it to finish."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        torch.cuda.synchronize()
        return grad


def _layer_ratio(name: str, config: LlavaConfig, cfg: CmoeConfig, tokens: int, device: str) -> None:
    """benchmarks/moe_layer.py's CMoE layer vs the dense MLP of equal active parameters, at this shape's width."""
    tc = config.text_config
    cuda = device == "cuda"
    seq = 64
    with torch.device(device):
        fns = build(tc.hidden_size, tc.intermediate_size, cfg.moe.initial_experts, cfg.moe.top_k)
        x = torch.randn(max(1, tokens // seq), seq, tc.hidden_size)
    if cuda:  # bf16 as in training, and a clock that waits for the device
        fns = {k: _on_gpu(fns[k]) for k in ("dense", "cmoe")}
    else:
        fns = {k: fns[k] for k in ("dense", "cmoe")}
    t = time_fwd_bwd(fns, x, repeats=10 if cuda else 3, warmup=3 if cuda else 1)
    print(f"[{name}] layer d={tc.hidden_size} I={tc.intermediate_size} E={cfg.moe.initial_experts} "
          f"top-{cfg.moe.top_k}, {x.shape[0] * seq} tokens, {'bf16' if cuda else 'fp32'}: dense "
          f"{t['dense'] * 1e3:.2f} ms, cmoe {t['cmoe'] * 1e3:.2f} ms, cmoe/dense {t['cmoe'] / t['dense']:.2f}", flush=True)
    del fns, x
    _free(cuda)


def _on_gpu(fn):  # noqa: ANN001, ANN202 - a module or function of one tensor
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(_SyncInBackward.apply(x))

    return run


def _mfu(flops_per_s: float) -> float | None:
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return flops_per_s / peak if peak else None


def _deepspeed_json() -> dict:
    return json.loads(resolve_config(DEEPSPEED, "cuda" if torch.cuda.is_available() else "cpu").read_text())


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main() -> int:
    """Run every shape of this device; a failing part is reported and the rest still runs (exit 1)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per training (default: 5 on GPU, 2 on CPU)")
    ap.add_argument("--cpu", action="store_true", help="run the CPU-sized part even when a GPU is visible")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    steps = args.steps or (5 if device == "cuda" else 2)
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu check: torch {torch.__version__} on {where}", flush=True)
    if device == "cpu":
        print("no CUDA device: SKIPPED the GPU shapes (0.5b, 7b); running the CPU-sized part (tiny shape)", flush=True)
    failed, t0 = [], time.perf_counter()
    for name, (config, cfg) in shapes(device).items():
        try:
            run_shape(name, config, cfg, device, steps)
        except Exception:  # noqa: BLE001 - report the part that failed, run the others
            failed.append(name)
            print(f"[{name}] FAILED:\n{traceback.format_exc()}", flush=True)
            _free(device == "cuda")
    print(f"gpu check: {'FAILED ' + ', '.join(failed) if failed else 'done'} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
