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
ENTRY_KEYS = {"acc_matrix", "avg_acc", "bwt", "forgetting", "maa", "locator_acc", "params_total", "params_added",
              "wall_s"}
SEQUENTIAL = ("cmoe", "naive-expand", "single-router", "seq-ft")


@pytest.fixture(scope="module")
def bench(suite: list[str], base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Every method over the two tiny tasks."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    return out, run_bench(stage_config(root / "home", base_dir), suite, list(METHODS), out)


def test_results_json_has_exactly_the_documented_schema(bench: tuple[Path, dict], suite: list[str]) -> None:
    out, returned = bench
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert set(results) == {"tasks", "methods"}
    assert results["tasks"] == [Path(b).name.split("-", 1)[1] for b in suite]
    assert list(results["methods"]) == list(METHODS)
    for name, entry in results["methods"].items():
        assert set(entry) == ENTRY_KEYS, name
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


def test_an_unknown_method_fails_before_any_work(make_cfg, suite: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown methods \['ewc'\]; choose from cmoe, naive-expand"):
        run_bench(make_cfg(), suite, ["cmoe", "ewc"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_bench_with_one_method_exits_0_and_writes_results(
    base_dir: Path, suite: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cmoe.cli import app

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(stage_config(tmp_path / "home", base_dir).model_dump(mode="json")))
    monkeypatch.chdir(tmp_path)  # a user's own folder, not the repository
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--tasks", ",".join(suite), "--methods", "cmoe", "--out", str(out),
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["cmoe"]
