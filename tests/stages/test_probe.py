"""PGKE probe: per-layer scores, the uniform-share threshold, the plan it implies, its files, no side effects."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from cmoe.config import CmoeConfig
from cmoe.model.cmoe_layer import CMoELayer, cmoe_layers
from cmoe.stages.common import StageError, open_lineage
from cmoe.stages.probe import ProbeReport, expert_size, make_plan, run_probe, threshold

from .conftest import Lineage, tree_digest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Routed:
    """What every CMoE layer saw while it recorded routing with a probe attached (the scoring pass)."""

    tokens: Counter = field(default_factory=Counter)  # layer -> tokens through the layer
    to_probe: Counter = field(default_factory=Counter)  # layer -> tokens the probe expert computed
    mass: Counter = field(default_factory=Counter)  # layer -> summed softmax of the router's probe column


@contextmanager
def count_probe_routing() -> Iterator[Routed]:
    """Count, with global module hooks, the tokens each probe receives in a scoring pass."""
    seen, recording = Routed(), {}  # recording: id(probe) -> its layer

    def before(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, CMoELayer) and module.recording and module.probe is not None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            seen.tokens[module.layer_index] += len(x)
            seen.mass[module.layer_index] += (x @ module.routers[-1].float().T).softmax(-1)[:, -1].sum().item()
            recording[id(module.probe)] = module

    def after(module: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
        layer = recording.get(id(module))
        if layer is not None and layer.recording:  # dispatch hands an expert only the rows routed to it
            seen.to_probe[layer.layer_index] += len(args[0])

    hooks = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(scope="module")
def probe_run(
    suite: list, base_dir: Path, tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CmoeConfig, ProbeReport, Routed]:
    """Task 1 probed with probe experts (`expand.growth: experts`) on the freshly upcycled base with the
    default threshold, its scoring pass counted (tests/stages/test_expand_delta.py probes a delta)."""
    from .conftest import stage_config

    root = tmp_path_factory.mktemp("probe")
    cfg = stage_config(root / "home", base_dir, expand={"growth": "experts"})
    with count_probe_routing() as routed:
        report = run_probe(cfg, suite[0], None, root / "out")
    return cfg, report, routed


def test_report_scores_every_cmoe_layer(probe_run: tuple[CmoeConfig, ProbeReport, Routed]) -> None:
    cfg, report, _ = probe_run
    layers = cmoe_layers(open_lineage(cfg, None)[0])
    assert sorted(report.scores) == sorted(str(i) for i in layers)
    assert all(s["experts"] == cfg.moe.initial_experts for s in report.scores.values())


def test_share_and_mass_are_what_the_probe_received_in_the_scoring_pass(
    probe_run: tuple[CmoeConfig, ProbeReport, Routed],
) -> None:
    _, report, routed = probe_run
    assert sorted(routed.tokens) == sorted(int(k) for k in report.scores)
    for layer, s in report.scores.items():
        i = int(layer)
        assert s["tokens"] == routed.tokens[i] > 0
        assert s["share"] == routed.to_probe[i] / routed.tokens[i]
        assert s["mass"] == pytest.approx(routed.mass[i] / routed.tokens[i], rel=1e-5)


def test_default_tau_is_the_uniform_share_with_the_probe_counted(
    probe_run: tuple[CmoeConfig, ProbeReport, Routed],
) -> None:
    _, report, _ = probe_run
    assert report.tau == pytest.approx(1 / 3)  # top-1 of the 2 upcycled experts + the probe
    assert all(s["tau"] == pytest.approx(1 / 3) for s in report.scores.values())


@pytest.mark.parametrize("tau", [0.0, 1.01], ids=["every-layer", "none-reaches-it"])
def test_the_stage_plans_by_the_configured_threshold(make_cfg, suite: list, tmp_path: Path, tau: float) -> None:
    """Whatever the scores: every share reaches tau 0 (one expert each), none exceeds 1 (then only the
    best-scoring layer grows: the tiny config's gain threshold says the task needs growth)."""
    cfg = make_cfg(probe={"tau": tau}, expand={"growth": "experts"})  # "where" places experts
    report = run_probe(cfg, suite[0], None, tmp_path / "probe")
    best = max(report.scores, key=lambda k: (report.scores[k]["share"], int(k)))  # ties: the later layer
    plan = {"0": 1, "1": 1} if tau == 0.0 else {best: 1}
    assert report.plan == plan
    assert report.params_to_add == sum(plan.values()) * expert_size(open_lineage(cfg, None)[0])


def test_a_layer_at_the_expert_cap_does_not_grow(make_cfg, suite: list, tmp_path: Path) -> None:
    """tau 0 would grow both layers; at moe.max_experts_per_layer = the 2 upcycled experts neither has room."""
    cfg = make_cfg(probe={"tau": 0.0}, moe={"max_experts_per_layer": 2}, expand={"growth": "experts"})
    assert run_probe(cfg, suite[0], None, tmp_path / "probe").plan == {}


def test_report_json_chart_and_probe_weights_are_written(probe_run: tuple[CmoeConfig, ProbeReport, Routed]) -> None:
    _, report, _ = probe_run
    assert json.loads(Path(report.report_json).read_text()) == json.loads(json.dumps(asdict(report)))
    assert Path(report.chart_png).read_bytes()[:8] == PNG_MAGIC
    tensors = load_file(report.probe_file)
    for layer in report.scores:  # a trained probe and the task router (probe column included) per layer
        assert f"{layer}.router" in tensors
        assert any(k.startswith(f"{layer}.probe.") for k in tensors)


def test_the_same_probe_twice_gives_the_same_scores(
    probe_run: tuple[CmoeConfig, ProbeReport, Routed], suite: list, tmp_path: Path,
) -> None:
    """Seeded like the expansion: the plan must not depend on what the process drew before."""
    cfg, first, _ = probe_run
    torch.manual_seed(12345)  # another global RNG state than the first run's
    again = run_probe(cfg, suite[0], None, tmp_path / "again")
    assert again.scores == first.scores and again.plan == first.plan
    assert again.train["final_loss"] == first.train["final_loss"]


def test_probing_leaves_the_parent_state_untouched(lineage: Lineage, tmp_path: Path) -> None:
    parent = lineage.state(0)
    before = tree_digest(parent)
    run_probe(lineage.cfg, lineage.bundles[1], parent, tmp_path / "probe")
    assert tree_digest(parent) == before


def test_a_task_already_in_the_lineage_cannot_be_probed_again(lineage: Lineage, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="already in this lineage"):
        run_probe(lineage.cfg, lineage.bundles[0], lineage.state(0), tmp_path / "probe")


# ---------------------------------------------------------------- the plan on hand-made scores
def scores(*shares: float, tau: float = 0.25) -> dict[int, dict]:
    return {i: {"share": s, "tau": tau} for i, s in enumerate(shares)}


def test_threshold_follows_config_tau_and_scale(make_cfg) -> None:
    assert threshold(make_cfg(), experts_before=3) == pytest.approx(1 / 4)  # top_k 1, E 3 + probe
    assert threshold(make_cfg(probe={"tau_scale": 0.5}), experts_before=3) == pytest.approx(1 / 8)
    assert threshold(make_cfg(probe={"tau": 0.4}), experts_before=3) == pytest.approx(0.4)


GAIN = 50.0  # accuracy points the probes added, far above any min_gain: the "where" tests below are about tau
ALL_LAYERS = {"max_layer_share": 1.0}


def test_layers_below_tau_get_nothing_when_another_reaches_it(make_cfg) -> None:
    assert make_plan(make_cfg(), scores(0.1, 0.26, 0.0), GAIN) == {1: 1}


def test_a_task_that_needs_growth_grows_its_best_layer_even_below_tau(make_cfg) -> None:
    assert make_plan(make_cfg(), scores(0.1, 0.2499, 0.0), GAIN) == {1: 1}


def test_a_gain_below_min_gain_empties_the_plan_whatever_the_shares(make_cfg) -> None:
    cfg = make_cfg(probe={**ALL_LAYERS, "min_gain": 2.0})
    assert make_plan(cfg, scores(0.9, 0.8), gain=1.99) == {}
    assert make_plan(cfg, scores(0.9, 0.8), gain=-5.0) == {}  # the probes made it worse
    assert make_plan(cfg, scores(0.9, 0.8), gain=2.0) == {0: 1, 1: 1}


def test_a_pool_that_already_answers_serves_at_percent_gets_an_empty_plan_whatever_the_probes_add(make_cfg) -> None:
    cfg = make_cfg(probe={**ALL_LAYERS, "min_gain": 2.0, "serves_at": 90.0})
    assert make_plan(cfg, scores(0.9, 0.8), gain=5.0, loss_drop=0.5, acc_pool=90.0) == {}
    assert make_plan(cfg, scores(0.9, 0.8), gain=5.0, loss_drop=0.5, acc_pool=89.9) == {0: 1, 1: 1}


def test_a_large_loss_drop_grows_the_task_even_without_an_accuracy_gain(make_cfg) -> None:
    # a hard task: the probes cut its answer loss long before its greedy answers turn right
    cfg = make_cfg(probe={**ALL_LAYERS, "min_gain": 2.0, "min_loss_drop": 0.5})
    assert make_plan(cfg, scores(0.9, 0.8), gain=-2.5, loss_drop=0.5) == {0: 1, 1: 1}
    assert make_plan(cfg, scores(0.9, 0.8), gain=1.0, loss_drop=0.49) == {}


def test_one_expert_at_tau_and_two_at_the_double_ratio(make_cfg) -> None:
    uncapped = {**ALL_LAYERS, "double_expert_ratio": 2.0}
    plan = make_plan(make_cfg(probe=uncapped), scores(0.25, 0.49, 0.5, 0.9, 0.2), GAIN)
    assert plan == {0: 1, 1: 1, 2: 2, 3: 2}
    assert make_plan(make_cfg(probe={**uncapped, "double_expert_ratio": 3.0}), scores(0.5, 0.75), GAIN) == {0: 1, 1: 2}


def test_every_layer_at_tau_gets_exactly_one_expert_when_uncapped(make_cfg) -> None:
    assert make_plan(make_cfg(probe=ALL_LAYERS), scores(0.3, 0.8, 0.1, 0.4, 0.6), GAIN) == {0: 1, 1: 1, 3: 1, 4: 1}


def test_each_layer_is_held_to_its_own_tau(make_cfg) -> None:
    # the same share passes a layer with many experts (low tau) and fails one with few (high tau)
    hand = {0: {"share": 0.3, "tau": 0.5}, 1: {"share": 0.3, "tau": 0.2}, 2: {"share": 0.2, "tau": 0.2}}
    assert make_plan(make_cfg(probe=ALL_LAYERS), hand, GAIN) == {1: 1, 2: 1}


def test_at_most_the_layer_share_grows_the_highest_scores_first(make_cfg) -> None:
    # five layers, four above tau: half of five rounds down to two
    assert make_plan(make_cfg(probe={"max_layer_share": 0.5}), scores(0.3, 0.8, 0.1, 0.4, 0.6), GAIN) == {1: 1, 4: 1}
    assert make_plan(make_cfg(probe={"max_layer_share": 0.1}), scores(0.3, 0.8), GAIN) == {1: 1}  # at least one


def test_a_growing_task_fills_up_to_min_layer_share_with_the_next_highest_scores(make_cfg) -> None:
    # four layers, one at tau: half of four is two, so the next-highest share (layer 2) grows too
    shares = scores(0.1, 0.5, 0.2, 0.05, tau=0.4)
    assert make_plan(make_cfg(probe={"max_layer_share": 0.5, "min_layer_share": 0.5}), shares, GAIN) == {1: 1, 2: 1}
    assert make_plan(make_cfg(probe={"max_layer_share": 0.5, "min_layer_share": 0.0}), shares, GAIN) == {1: 1}


def test_min_layer_share_never_grows_a_task_the_pool_serves(make_cfg) -> None:
    cfg = make_cfg(probe={"max_layer_share": 1.0, "min_layer_share": 1.0, "min_gain": 2.0})
    assert make_plan(cfg, scores(0.9, 0.8), gain=1.0) == {}


def test_max_layer_share_caps_min_layer_share(make_cfg) -> None:
    shares = scores(0.1, 0.5, 0.2, 0.05, tau=0.4)
    assert make_plan(make_cfg(probe={"max_layer_share": 0.25, "min_layer_share": 1.0}), shares, GAIN) == {1: 1}


def test_the_layer_cap_keeps_the_highest_scores_with_doubling(make_cfg) -> None:
    plan = make_plan(make_cfg(probe={"max_layer_share": 0.4, "double_expert_ratio": 2.0}),
                     scores(0.3, 0.8, 0.1, 0.4, 0.6), GAIN)
    assert plan == {1: 2, 4: 2}
