"""`cmoe bench`: five methods over the same two tasks, one results.json schema, a table and a heatmap each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cmoe.stages.bench import METHODS, run_bench

from .conftest import stage_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"acc_matrix", "avg_acc", "mfn", "bwt", "forgetting", "maa", "mft", "locator_acc", "params_total",
            "params_added", "wall_s"}
ENTRY_KEYS = RUN_KEYS | {"range", "per_seed"}  # means over seeds, their [min, max], each seed's run
SEQUENTIAL = ("cmoe", "naive-expand", "single-router", "seq-ft")


@pytest.fixture(scope="session")
def uris(suite: list) -> list[str]:
    """The tiny suite's bundles as the URIs `cmoe bench` is given."""
    return [b.uri for b in suite]


@pytest.fixture(scope="module")
def bench(uris: list[str], base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Every method over the two tiny tasks."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    return out, run_bench(stage_config(root / "home", base_dir), uris, list(METHODS), out)


def test_results_json_has_exactly_the_documented_schema(bench: tuple[Path, dict], uris: list[str]) -> None:
    out, returned = bench
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert set(results) == {"tasks", "seeds", "methods"} and results["seeds"] == [0]
    assert results["tasks"] == [Path(b).name.split("-", 1)[1] for b in uris]
    assert list(results["methods"]) == list(METHODS)
    for name, entry in results["methods"].items():
        assert set(entry) == ENTRY_KEYS and [set(run) for run in entry["per_seed"]] == [RUN_KEYS], name
        assert len(entry["params_added"]) == 2 and entry["params_total"] > 0 and entry["wall_s"] > 0


def test_matrices_are_lower_triangular_percentages(bench: tuple[Path, dict]) -> None:
    _, results = bench
    for name, entry in results["methods"].items():
        m = entry["acc_matrix"]
        assert len(m) == 2 and all(len(row) == 2 for row in m), name
        assert m[0][1] is None, name
        assert all(0.0 <= a <= 100.0 for row in m for a in row if a is not None), name
        assert entry["avg_acc"] == pytest.approx(sum(m[-1]) / 2), name
    for name in SEQUENTIAL:  # every step is evaluated
        assert results["methods"][name]["acc_matrix"][0][0] is not None
        assert results["methods"][name]["bwt"] is not None


def test_only_the_per_task_router_methods_report_a_locator(bench: tuple[Path, dict]) -> None:
    _, results = bench
    located = {name for name, e in results["methods"].items() if e["locator_acc"] is not None}
    assert located == {"cmoe", "naive-expand"}


def test_joint_has_no_sequence_metrics(bench: tuple[Path, dict]) -> None:
    _, results = bench
    joint = results["methods"]["joint"]
    assert (joint["bwt"], joint["forgetting"], joint["maa"]) == (None, None, None)
    assert joint["acc_matrix"][0] == [None, None]


def test_cmoe_grows_no_more_than_naive_expand(bench: tuple[Path, dict]) -> None:
    _, results = bench
    naive = sum(results["methods"]["naive-expand"]["params_added"])
    cmoe = sum(results["methods"]["cmoe"]["params_added"])
    assert naive > 0
    assert cmoe <= naive


def test_results_md_has_a_row_and_a_heatmap_per_method(bench: tuple[Path, dict]) -> None:
    out, _ = bench
    lines = (out / "results.md").read_text().splitlines()
    for name in METHODS:
        assert sum(line.startswith(f"| {name} |") for line in lines) == 2, name  # summary + per-task table
        assert (out / f"{name}-accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_an_unknown_method_fails_before_any_work(make_cfg, uris: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown methods \['ewc'\]; choose from cmoe, naive-expand"):
        run_bench(make_cfg(), uris, ["cmoe", "ewc"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_bench_with_one_method_exits_0_and_writes_results(
    base_dir: Path, uris: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cmoe.cli import app

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(stage_config(tmp_path / "home", base_dir).model_dump(mode="json")))
    monkeypatch.chdir(tmp_path)  # a user's own folder, not the repository
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--tasks", ",".join(uris), "--methods", "cmoe", "--out", str(out),
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["cmoe"]


def test_two_seeds_report_the_mean_and_range_of_each_summary(make_cfg, uris: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = run_bench(make_cfg(), uris, ["seq-ft"], out, seeds=[0, 1])
    entry = results["methods"]["seq-ft"]
    runs = entry["per_seed"]
    assert results["seeds"] == [0, 1] and len(runs) == 2
    assert [p.name for p in sorted((out / "work" / "seq-ft").iterdir())] == ["seed-0", "seed-1"]
    avgs = [r["avg_acc"] for r in runs]
    assert entry["avg_acc"] == pytest.approx(sum(avgs) / 2) and entry["range"]["avg_acc"] == [min(avgs), max(avgs)]
    assert entry["acc_matrix"][1][0] == pytest.approx((runs[0]["acc_matrix"][1][0] + runs[1]["acc_matrix"][1][0]) / 2)
    assert entry["acc_matrix"][0][1] is None
    assert entry["params_added"] == [(a + b) / 2 for a, b in zip(runs[0]["params_added"], runs[1]["params_added"])]
    md = (out / "results.md").read_text()
    assert "Means over seeds 0, 1" in md and sum(line.startswith("| seq-ft |") for line in md.splitlines()) == 3


def test_cli_bench_refuses_seeds_that_are_not_integers(tmp_path: Path) -> None:
    from cmoe.cli import app

    result = CliRunner().invoke(app, ["bench", "--tasks", "x", "--seeds", "0,one", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--seeds '0,one': give comma-separated integers" in result.output
