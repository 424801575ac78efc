"""The DeepSpeed trainer: frozen tensors untouched, exact resume, world size 2 == world size 1, fail-fast checks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from cmoe.net import free_port
from cmoe.stages.trainer import GlobalBatch, TrainSpec, _epoch_order, _lr_factor, train

from .ddp_train_script import build, collate, loss_fn, train_spec

SCRIPT = Path(__file__).with_name("ddp_train_script.py")


class Interrupt(RuntimeError):
    """Raised from on_log to stop a run the way a crash would."""


def frozen_digest(model: torch.nn.Module) -> str:
    """sha256 over every frozen tensor's bytes."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            h.update(name.encode() + p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(model: torch.nn.Module, data: list, spec: TrainSpec, on_log=None):
    """train() on the model's current trainable parameters."""
    return train(model, [p for p in model.parameters() if p.requires_grad], data, collate, loss_fn, spec, on_log)


@pytest.mark.parametrize("config", ["zero0", "zero2_cpu.json"])
def test_trains_only_the_given_params(config: str) -> None:
    model, data = build(0)
    frozen, before = frozen_digest(model), trainable(model)
    logs: list[tuple[int, dict]] = []
    spec = TrainSpec(epochs=2, batch_size=16, lr=1e-2, warmup_ratio=0.25, deepspeed_config=config, log_every=4)
    result = run(model, data, spec, on_log=lambda step, m: logs.append((step, m)))

    assert frozen_digest(model) == frozen
    assert all(not torch.equal(before[n], p) for n, p in trainable(model).items())
    assert (result.steps, result.samples, result.world_size, result.device) == (12, 192, 1, "cpu")
    assert result.resumed_from_step is None and result.samples_per_s > 0
    json.dumps(asdict(result))
    # Logged every 4 steps with this step's rate: warm-up over ceil(0.25 × 12) = 3 steps, then cosine.
    assert [s for s, _ in logs] == [4, 8, 12]
    assert set(logs[0][1]) == {"loss", "lr", "samples_per_s"}
    assert [m["lr"] for _, m in logs] == pytest.approx([1e-2 * _lr_factor(s - 1, 3, 12) for s in (4, 8, 12)])


def test_lr_schedule_and_data_order() -> None:
    lrs = [_lr_factor(s, warmup=4, total=40) for s in range(40)]
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and 0 < lrs[-1] < 0.01
    assert _lr_factor(0, warmup=0, total=1) == 1.0
    assert torch.equal(_epoch_order(50, 3, 1), _epoch_order(50, 3, 1))
    assert not torch.equal(_epoch_order(50, 3, 1), _epoch_order(50, 3, 2))
    assert sorted(_epoch_order(50, 3, 1).tolist()) == list(range(50))


@pytest.mark.parametrize("config", ["zero0", "zero2"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, config: str) -> None:
    spec = dict(steps=40, batch_size=16, deepspeed_config=config, checkpoint_every=5, log_every=1, seed=3)
    model, data = build(3)
    frozen = frozen_digest(model)
    losses: list[float] = []
    uninterrupted = TrainSpec(**spec, checkpoint_dir=tmp_path / "a")
    reference = run(model, data, uninterrupted, lambda _, metrics: losses.append(metrics["loss"]))
    expected = trainable(model)
    assert not (tmp_path / "a").exists()  # checkpoints are deleted after a successful run
    assert reference.mean_loss_last_10pct < 0.8 * losses[0]  # it learns

    def stop(step: int, metrics: dict) -> None:
        if step == 27:
            raise Interrupt

    ckpt = tmp_path / "b"
    model, data = build(3)
    with pytest.raises(Interrupt):
        run(model, data, TrainSpec(**spec, checkpoint_dir=ckpt), on_log=stop)
    assert (ckpt / "latest").read_text() == "step25"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step20", "step25"]  # only the last two are kept

    model, data = build(3)  # a fresh process would rebuild the model the same way
    resumed = run(model, data, TrainSpec(**spec, checkpoint_dir=ckpt))
    assert resumed.resumed_from_step == 25 and resumed.steps == 40
    for name, tensor in trainable(model).items():
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6), name
    assert frozen_digest(model) == frozen
    assert resumed.final_loss == pytest.approx(reference.final_loss, abs=1e-6)
    assert resumed.mean_loss_last_10pct == pytest.approx(reference.mean_loss_last_10pct, abs=1e-6)
    assert not ckpt.exists()


def test_resume_refuses_another_runs_checkpoint(tmp_path: Path) -> None:
    def stop(step: int, metrics: dict) -> None:
        raise Interrupt

    model, data = build(0)
    with pytest.raises(Interrupt):
        run(model, data, TrainSpec(steps=4, batch_size=16, checkpoint_dir=tmp_path, checkpoint_every=1), stop)
    with pytest.raises(ValueError, match="different run"):
        run(model, data, TrainSpec(steps=4, batch_size=16, seed=1, checkpoint_dir=tmp_path))
    with pytest.raises(ValueError, match="another ZeRO stage"):
        run(model, data, TrainSpec(steps=4, batch_size=16, deepspeed_config="zero1", checkpoint_dir=tmp_path))


def test_second_call_on_a_grown_model(tmp_path: Path) -> None:
    model, data = build(0)
    run(model, data, TrainSpec(steps=3, batch_size=16, deepspeed_config="zero2"))
    # Grow the model the way expansion does: freeze what exists, add a new trainable part.
    model.requires_grad_(False)
    model.append(torch.nn.Linear(3, 3))
    frozen, before = frozen_digest(model), trainable(model)
    run(model, data, TrainSpec(steps=3, batch_size=16, deepspeed_config="zero2"))
    assert frozen_digest(model) == frozen
    assert all(not torch.equal(before[n], p) for n, p in trainable(model).items())
    assert not model._forward_pre_hooks and not model._forward_hooks  # no engine left attached


def test_gpu_config_keeps_weights_fp32() -> None:
    # On CPU the GPU JSON still runs (autocast bf16 on CPU): a smoke test of the file itself.
    model, data = build(0)
    frozen, dtypes = frozen_digest(model), []

    def bf16_loss(engine: torch.nn.Module, batch: dict, glob: GlobalBatch) -> torch.Tensor:
        logits = engine(batch["x"])
        dtypes.append(logits.dtype)
        return glob.share(torch.nn.functional.cross_entropy(logits.float(), batch["y"]), len(batch["y"]))

    params = [p for p in model.parameters() if p.requires_grad]
    train(model, params, data, collate, bf16_loss, TrainSpec(steps=2, batch_size=16, deepspeed_config="zero2_gpu_bf16"))
    assert dtypes == [torch.bfloat16] * 2  # compute in bf16 ...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ... weights stay fp32
    assert frozen_digest(model) == frozen


def token_loss(engine: torch.nn.Module, batch: dict, glob: GlobalBatch) -> torch.Tensor:
    """Cross-entropy over each example's 1-4 repeated "tokens": a token mean over the global batch."""
    logits = engine(batch["x"]).unsqueeze(1).expand(-1, batch["labels"].shape[1], -1)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="sum")
    return per_token / glob.label_tokens


def token_collate(items: list) -> dict:
    """(x, y) pairs with y repeated 1-4 times per example (the rest -100): examples of unequal weight."""
    batch = collate(items)
    n_tokens = (batch["x"][:, 4].abs() * 3).long().clamp(0, 3) + 1
    labels = batch["y"].unsqueeze(1).repeat(1, 4)
    batch["labels"] = labels.masked_fill(torch.arange(4) >= n_tokens.unsqueeze(1), -100)
    return batch


def test_gradient_accumulation_gives_the_update_of_one_forward_over_the_global_batch(tmp_path: Path) -> None:
    """Micro-batches of unequal token counts: shares of the global token mean add up to it exactly."""
    accum4 = tmp_path / "accum4.json"
    accum4.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 0}}))
    weights, losses = [], []
    for config in ("zero0", accum4):
        model, data = build(0)
        params = [p for p in model.parameters() if p.requires_grad]
        result = train(model, params, data, token_collate, token_loss,
                       TrainSpec(steps=6, batch_size=16, lr=1e-2, deepspeed_config=config))
        weights.append(trainable(model))
        losses.append(result.final_loss)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], rtol=0, atol=1e-6), name


def test_fails_fast_on_bad_input(tmp_path: Path) -> None:
    model, data = build(0)
    params = [p for p in model.parameters() if p.requires_grad]
    bad_accum = tmp_path / "accum3.json"
    bad_accum.write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_accumulation_steps": 3}))
    cases = [
        (dict(deepspeed_config="zero9_cpu.json"), FileNotFoundError, "unknown deepspeed_config"),
        (dict(deepspeed_config=bad_accum), ValueError, "not divisible by world size"),
        (dict(epochs=1), ValueError, "exactly one of epochs / steps"),
        (dict(batch_size=128), ValueError, "fewer than one global batch"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            train(model, params, data, collate, loss_fn, TrainSpec(**{"steps": 2, "batch_size": 16, **overrides}))
    spec = TrainSpec(steps=2, batch_size=16)
    with pytest.raises(ValueError, match="dataset is empty"):
        train(model, params, [], collate, loss_fn, spec)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, [], data, collate, loss_fn, spec)
    with pytest.raises(ValueError, match="missing from params"):
        train(model, params[:1], data, collate, loss_fn, spec)


def _two_processes(*args: str) -> subprocess.CompletedProcess:
    """Run the helper script under torchrun with two processes (ZeRO-2)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    # Drop the rank variables the in-process tests set: the child would join this process's group.
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars} | {"OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(SCRIPT), "--config", "zero2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process_to_the_weights_of_one(tmp_path: Path) -> None:
    # Equal final weights need the two processes' first 10 steps to equal one process's: a whole
    # two-process run against one is tests/production/test_expand_multiprocess.py, through the stage.
    # The one-process runs are this process's, with the script's spec.
    model, data = build(0)
    run(model, data, train_spec(config="zero2"))
    expected = trainable(model)
    # ZeRO-2 with 2 processes, stopped after its step-10 checkpoint; one process finishes the run.
    ckpt = tmp_path / "ckpt"
    stopped = _two_processes("--checkpoint-dir", str(ckpt), "--stop-at", "12")
    assert stopped.returncode != 0 and (ckpt / "latest").read_text() == "step10", stopped.stderr[-3000:]
    model, data = build(0)
    resumed = run(model, data, train_spec(config="zero2", checkpoint_dir=ckpt))
    assert (resumed.resumed_from_step, resumed.world_size) == (10, 1)
    for name, tensor in trainable(model).items():
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-5), name
    assert not ckpt.exists()
