"""`cmoe tune`: a tau_scale sweep over the tiny pilot bundles writes a config `cmoe run` loads, a Pareto chart,
and records both in the config's MLflow; the rule picks the leanest point near the best Avg; bad input
writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cmoe.config import load_config
from cmoe.stages.tune import TunePoint, choose

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config_file(cfg, folder: Path) -> Path:  # noqa: ANN001 - CmoeConfig
    path = folder / "pilot.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_tune_writes_the_chosen_tau_scale_into_a_loadable_config_and_logs_the_chart(
        suite: list, make_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    from mlflow import MlflowClient

    from cmoe.cli import app
    from cmoe.registry import tracking_uri

    cfg = make_cfg()
    source = _config_file(cfg, tmp_path)
    out = tmp_path / "tune"
    result = CliRunner().invoke(app, ["tune", "--pilot", *(b.uri for b in suite), "--grid", "0.5,2",
                                      "--out", str(out), "--config", str(source)])
    assert result.exit_code == 0, result.output

    tuned = load_config(out / "config.yaml")
    assert tuned.probe.tau_scale in (0.5, 2.0)
    # every other value is the input file's
    assert tuned.model_copy(update={"probe": cfg.probe}) == load_config(source)
    assert (out / "pareto.png").read_bytes().startswith(PNG_MAGIC)

    client = MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
                               "tags.`cmoe.tune` = 'true'")
    assert run.data.metrics["chosen.tau_scale"] == tuned.probe.tau_scale
    assert {"pareto.png", "config.yaml", "tune.md", "tune_table.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(client.get_metric_history(run.info.run_id, "point.avg_acc")) == 2  # one step per grid point


def test_the_rule_takes_the_fewest_params_among_points_near_the_best_avg() -> None:
    points = [TunePoint(0.5, 80.0, 900, 9, None, None, 1.0), TunePoint(1.0, 79.5, 500, 5, None, None, 1.0),
              TunePoint(2.0, 70.0, 100, 1, None, None, 1.0)]
    assert choose(points, max_avg_drop=1.0)[0] == 1  # 2.0 adds fewer, but loses 10 points
    assert choose(points, max_avg_drop=0.0)[0] == 0
    assert choose(points, max_avg_drop=10.0)[0] == 2


@pytest.mark.parametrize("grid, message", [("0.5,0", "must be a finite number > 0"), ("1,1", "repeat"),
                                           ("a,b", "comma-separated numbers")])
def test_a_bad_grid_is_one_clear_error_and_nothing_is_written(
        grid: str, message: str, suite: list, make_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    from cmoe.cli import app

    result = CliRunner().invoke(app, ["tune", "--pilot", suite[0].uri, "--grid", grid, "--out", str(tmp_path / "out"),
                                      "--config", str(_config_file(make_cfg(), tmp_path))])
    assert result.exit_code == 2 and message in result.output and f"--grid {grid!r}" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("pilot, rc, message", [([], 2, "give the pilot bundles"),
                                                (["first", "missing"], 1, "bundle folder not found")])
def test_no_bundle_or_an_unreadable_one_is_refused_before_anything_is_written(
        pilot: list[str], rc: int, message: str, suite: list, make_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    from cmoe.cli import app

    uris = [suite[0].uri if p == "first" else str(tmp_path / p) for p in pilot]
    result = CliRunner().invoke(app, ["tune", *(["--pilot", *uris] if uris else []), "--out", str(tmp_path / "out"),
                                      "--config", str(_config_file(make_cfg(), tmp_path))])
    assert result.exit_code == rc and message in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "home").exists()
