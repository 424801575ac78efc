"""`cmoe plan-resources`: the plan's parameters and optimizer state are what a real run holds; a 7 B
config is planned without weights; a config.json it cannot size is one clean error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cmoe
from cmoe.cli import app
from cmoe.config import tiny_test_config
from cmoe.model.base import load_base
from cmoe.model.cmoe_layer import add_expert, add_task, attach_probes, cmoe_layers, drop_probes, trainable_parameters
from cmoe.model.params import count_params
from cmoe.model.routing import route
from cmoe.model.sizing import StagePlan, plan_resources, training_setup
from cmoe.model.surgery import convert_to_cmoe

REPO = Path(cmoe.__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "llava-1.5-7b"


def _cpu_setup(name: str = "zero0_cpu.json"):  # noqa: ANN202 - a TrainingSetup
    path = REPO / "infra" / "deepspeed" / name
    return training_setup(json.loads(path.read_text()), path.name)


def _measure(model: torch.nn.Module, processor, task: str) -> tuple[int, int, int]:  # noqa: ANN001 - VLProcessor
    """(params, trainable params, bytes of AdamW state after one real step): what the stage holds."""
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)  # the trainer's optimizer (DeepSpeed with torch_adam)
    batch = processor.collate([processor.encode(Image.new("RGB", (32, 32), "red"), "what colour?", "red")] * 2)
    with route(model, [task]):
        model(**batch).loss.backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    return count_params(model).total, sum(p.numel() for p in params), state


def test_the_tiny_default_plan_matches_the_parameters_and_optimizer_state_of_a_real_step(
        tiny_base: Path, tmp_path: Path) -> None:
    cfg = tiny_test_config(tmp_path)  # the recipe tiny_base was built with: its base section is the plan's shape
    plan = {s.stage: s for s in plan_resources(None, cfg, _cpu_setup(), _cpu_setup()).stages}
    model, processor = load_base(tiny_base)
    convert_to_cmoe(model, cfg.moe, base_path=str(tiny_base))  # as the probe and the expansion open the lineage
    add_task(model, "t1")
    attach_probes(model, source=0)
    measured = {"probe": _measure(model, processor, "t1")}
    drop_probes(model)
    for i in cmoe_layers(model):  # tiny_test_config lets every layer grow, one expert each
        add_expert(model, i)
    measured["expansion"] = _measure(model, processor, "t1")
    for stage, (total, trainable, optimizer_bytes) in measured.items():
        planned = plan[stage]
        assert planned.params_total == pytest.approx(total, rel=0.2), stage
        assert planned.trainable == pytest.approx(trainable, rel=0.2), stage
        assert planned.optimizer_bytes == pytest.approx(optimizer_bytes, rel=0.2), stage


def test_zero_stages_split_optimizer_state_then_gradients_over_the_ranks() -> None:
    def stage(zero: int) -> StagePlan:
        setup = training_setup({"zero_optimization": {"stage": zero}}, f"zero{zero}")
        return StagePlan("expansion", 8, 10, 100, 10, 400, 0, 40, 80, 1, setup, distributed=True)

    assert stage(0).per_gpu(2) == {"weights": 400, "gradients": 40, "optimizer": 80, "activations": 4}
    assert stage(1).per_gpu(2) == {"weights": 400, "gradients": 40, "optimizer": 40, "activations": 4}
    assert stage(2).per_gpu(2) == {"weights": 400, "gradients": 20, "optimizer": 40, "activations": 4}
    assert stage(2).per_gpu(3) is None  # a global batch of 8 does not split over 3 ranks


def test_stages_that_run_in_one_process_are_planned_on_one_gpu_only() -> None:
    plan = plan_resources(None, tiny_test_config("."), _cpu_setup("zero2_cpu.json"))
    assert {s.stage: s.per_gpu(2) is not None for s in plan.stages} == {
        "probe": False, "expansion": True, "evaluation": False}


def test_the_7b_example_is_planned_from_its_config_json_and_names_the_gpus_it_needs() -> None:
    result = CliRunner().invoke(app, ["plan-resources", "--base", str(EXAMPLE), "--config", str(EXAMPLE / "cmoe.yaml")])
    assert result.exit_code == 0, result.output
    assert "dense 7.06 B params" in result.output
    assert "one task (probe, expansion, evaluation) on 141 GB GPUs: 1 GPU" in result.output


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.pop("vision_config"), "vision_config missing"),
    (lambda c: c["text_config"].pop("model_type"), "text_config.model_type missing"),
    (lambda c: c.update(model_type="bert"), "model_type is 'bert'"),
])
def test_a_config_json_it_cannot_size_is_one_error_line_naming_the_field(edit, message: str, tmp_path: Path) -> None:  # noqa: ANN001
    config = json.loads((EXAMPLE / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["plan-resources", "--base", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'config.json'}: {message}"), lines
    assert result.stdout == ""


def test_tasks_already_learned_weigh_in_frozen_and_only_widen_the_new_router() -> None:
    cfg = tiny_test_config(".")
    first, later = (plan_resources(None, cfg, _cpu_setup(), learned_tasks=n) for n in (0, 3))
    grown = 3 * first.experts_per_task  # experts the three earlier tasks added, at most
    for a, b in zip(first.stages, later.stages):
        assert b.params_total - a.params_total >= grown * first.per_expert, a.stage  # + their routers
        if a.trainable:  # the new router has a column (text_hidden weights) for each of those experts
            assert b.trainable - a.trainable == grown * first.shape["text_hidden"], a.stage


def _by_stage(cfg) -> dict[str, StagePlan]:  # noqa: ANN001 - a CmoeConfig
    return {s.stage: s for s in plan_resources(None, cfg, _cpu_setup("zero0_gpu_bf16.json")).stages}


def test_gradient_checkpointing_plans_less_activation_memory_for_the_training_stages() -> None:
    cfg = tiny_test_config(".")
    plain = _by_stage(cfg)
    cfg.expand.gradient_checkpointing = True
    checkpointed = _by_stage(cfg)
    for stage in ("probe", "expansion"):
        assert checkpointed[stage].activation_bytes_per_sample < plain[stage].activation_bytes_per_sample, stage
        assert checkpointed[stage].weights_bytes == plain[stage].weights_bytes, stage
    assert checkpointed["evaluation"] == plain["evaluation"]  # decoding keeps no activations for a backward


def test_a_bf16_base_plans_less_weight_memory_and_what_trains_stays_fp32() -> None:
    cfg = tiny_test_config(".")
    fp32 = _by_stage(cfg)
    cfg.base.dtype = "bfloat16"
    bf16 = _by_stage(cfg)
    for stage, plan in bf16.items():
        assert plan.weights_bytes + plan.weight_copies_bytes < fp32[stage].weights_bytes + fp32[stage].weight_copies_bytes
    for stage in ("probe", "expansion"):
        plan = bf16[stage]  # the frozen base in 2 bytes, what trains in 4 (and autocast's 2-byte copy of it)
        assert plan.weights_bytes == 2 * (plan.params_total - plan.trainable) + 4 * plan.trainable, stage
        assert plan.weight_copies_bytes == 2 * plan.trainable, stage
        assert plan.optimizer_bytes == fp32[stage].optimizer_bytes, stage
