"""The expansion stage as 2 processes (torchrun, gloo on CPU) against 1 process.

With the same seed and global batch the two ranks each take half of every batch, and the new
experts come out as those of one process up to float rounding, with cmoe's own training loss: the
LM loss is a mean over the answer tokens of the *global* batch (HF's `num_items_in_batch`) and the
load-balancing counts are summed over the ranks, so how the batch is split does not matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cmoe.config import tiny_test_config

TASK_DIR = "tasks"


def child_env() -> dict[str, str]:
    """This environment without the rank-0-of-1 rendezvous variables an in-process training left behind."""
    from cmoe.stages.launch import _RANK_ENV

    return {k: v for k, v in os.environ.items() if k not in _RANK_ENV}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_expand_to_the_weights_of_one_and_the_state_loads_in_one(
    tiny_suite: list[Path], tiny_base: Path, tmp_path: Path
) -> None:
    from cmoe.data.validate import open_bundle
    from cmoe.model.cmoe_layer import cmoe_layers
    from cmoe.model.state import load_state
    from cmoe.stages import launch
    from cmoe.stages.probe import ProbeReport

    bundle = str(tiny_suite[0])
    cfg = tiny_test_config(tmp_path / "home")
    cfg.base.path = str(tiny_base)
    assert cfg.moe.aux_loss_coef > 0  # the default loss, load balancing included
    cfg.moe.top_k = 2  # as the default config: with top-1 the gate is always 1 and the router gets no gradient
    cfg.expand.epochs = 4  # >= 4 optimizer steps of global batch 16
    opened = open_bundle(bundle)
    task = opened.name
    # Grow one expert in each CMoE layer (a copy of expert 0, as a plan without probe warm start does).
    plan = ProbeReport(task=task, bundle_sha256="", tau=0.5, scores={}, plan={"0": 1, "1": 1}, params_to_add=0,
                       est_train_s=0.0, report_json="", chart_png="", probe_file=None)
    config = tmp_path / "cmoe.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(asdict(plan)))

    # One process: the entry point run by plain python.
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "cmoe.stages.expand_main", "--config", str(config),
                           "--bundle", str(bundle), "--probe", str(probe), "--out", str(one)],
                          capture_output=True, text=True, timeout=300, check=False, env=child_env())
    assert done.returncode == 0, done.stderr[-4000:]
    # Two processes: the launcher the flow uses, configured for torchrun --nproc_per_node 2.
    cfg.expand.nproc_per_node = 2
    two = tmp_path / "two"
    curve: list[int] = []
    result = launch.expand(cfg, opened, None, plan, two, on_log=lambda step, metrics: curve.append(step))

    r1 = json.loads((one / "expand.json").read_text())
    assert (r1["train"]["world_size"], result.train["world_size"]) == (1, 2)
    assert r1["train"]["steps"] == result.train["steps"] >= 4
    assert r1["params_added"] == result.params_added > 0
    assert r1["train"]["final_loss"] == pytest.approx(result.train["final_loss"], abs=1e-5)
    assert curve == list(range(1, result.train["steps"] + 1))  # rank 0's curve, every step (log_every 1), once
    assert not (two / "checkpoints").exists()  # resume checkpoints are transient
    assert sorted(p.name for p in two.iterdir()) == ["expand.json", "launch", "state"]  # rank 0 wrote once

    for kind, atol in (("experts", 1e-5), ("router", 1e-5), ("locator", 1e-6)):
        a = load_file(one / "state" / TASK_DIR / task / f"{kind}.safetensors")
        b = load_file(two / "state" / TASK_DIR / task / f"{kind}.safetensors")
        assert a.keys() == b.keys() and a, kind
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= atol, f"{kind}: max |1 process - 2 processes| = {worst:.2e} > {atol:g}"

    # The 2-process state loads in one process and computes what the 1-process state computes.
    m1, m2 = load_state(one / "state"), load_state(two / "state")
    for i, layer in cmoe_layers(m2).items():
        new, source = layer.experts[-1], layer.experts[0]
        moved = max((p - q).abs().max().item() for p, q in zip(new.parameters(), source.parameters()))
        assert moved > 1e-3, f"layer {i}: the new expert did not train"  # not trivially equal
    from cmoe.model.routing import route
    from cmoe.data.guard import training_scope
    from cmoe.data.loading import load_split
    from cmoe.stages.common import encode_rows, open_lineage

    _, processor = open_lineage(cfg, one / "state")
    with training_scope(opened, {}):
        data = encode_rows(opened.spec, load_split(opened, "train", cache_dir=cfg.home / "cache"), processor,
                           with_answers=True)
    # Answers of several token lengths: a per-micro-batch token mean would have made the ranks differ.
    assert len({int((e.labels != -100).sum()) for e in data.encoded}) > 1
    batch = processor.collate(data.encoded[:16])
    with torch.no_grad(), route(m1, [task]), route(m2, [task]):
        assert m1(**batch).loss.item() == pytest.approx(m2(**batch).loss.item(), abs=1e-5)
