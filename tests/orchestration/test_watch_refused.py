"""A bad bundle in the inbox never blocks the watcher: refused once with the reason, skipped while
unchanged, nothing registered for it, and every other bundle is handled. And with the champion it
leaves: `cmoe predict` refuses a question its model has no positions for."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.config import load_config
from cmoe.registry import Registry

from .conftest import tiny_config_file


@pytest.fixture(scope="module")
def inbox(suite: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """b-good (a valid bundle), a-link (its copy with a symlink inside), a-corrupt (the other task, one of
    its images does not decode)."""
    folder = tmp_path_factory.mktemp("inbox")
    shutil.copytree(suite[0], folder / "b-good")
    link = shutil.copytree(suite[0], folder / "a-link")
    image = next((link / "train").rglob("*.png"))
    image.unlink()
    os.symlink(next((suite[0] / "train").rglob("*.png")), image)
    corrupt = shutil.copytree(suite[1], folder / "a-corrupt")
    next((corrupt / "test").rglob("*.png")).write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def watched(prefect_api: None, inbox: Path, base_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(config, outcomes) of the first watch over the inbox."""
    from flows.watch import watch_inbox

    config = tiny_config_file(tmp_path_factory.mktemp("watch"), base_dir, "auto", inbox=str(inbox))
    return config, watch_inbox(config)


def test_bad_bundles_are_refused_recorded_and_skipped_while_the_good_one_is_learned(
        watched, inbox: Path, suite: list[Path]) -> None:  # noqa: ANN001
    from flows.watch import read_refused, refused_path, watch_inbox

    config, first = watched
    cfg = load_config(config)
    assert [o.decision for o in first] == ["approved"]  # b-good, though two bad bundles arrived with it

    records = {r["name"]: r["reason"] for r in read_refused(refused_path(cfg)).values()}
    assert sorted(records) == ["a-corrupt", "a-link"]
    assert "symlink" in records["a-link"] and "train/" in records["a-link"]
    assert "cannot decode image" in records["a-corrupt"]
    registry = Registry(cfg)
    assert [v.task for v in registry.versions()] == [first[0].task]  # nothing registered for the refused ones

    # Later polls: nothing new, the refused bundles are skipped (not re-read), and the watcher succeeds.
    result = CliRunner().invoke(app, ["watch", "--once", "--config", config])
    assert result.exit_code == 0, result.output
    assert watch_inbox(config) == []

    # Once the user fixes a bundle (it changes), it is looked at again.
    bad = next((inbox / "a-corrupt" / "test").rglob("*.png"))
    shutil.copy(suite[1] / bad.relative_to(inbox / "a-corrupt"), bad)
    assert [o.decision for o in watch_inbox(config)] == ["approved"]


def test_watch_once_on_a_missing_inbox_is_an_error(prefect_api: None, base_dir: Path, tmp_path: Path) -> None:
    config = tiny_config_file(tmp_path, base_dir, "auto")
    result = CliRunner().invoke(app, ["watch", "--once", "--config", config, "--inbox", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert f"inbox {tmp_path / 'nowhere'} does not exist" in result.stderr


def test_predict_refuses_a_question_longer_than_the_model_positions(watched, suite: list[Path]) -> None:  # noqa: ANN001
    image = next((suite[0] / "test").rglob("*.png"))
    question = " ".join(f"w{i}" for i in range(400))  # 1 900 characters: within the text limit, ~800 tokens
    result = CliRunner().invoke(app, ["predict", "--image", str(image), "--question", question, "--config", watched[0]])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: --question: too long for the model: its prompt is ")
    assert "over the model's 256 positions" in result.stderr
