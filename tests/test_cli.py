"""Every `cmoe` command that reads a config refuses a bad one the same way: one line, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmoe.cli import app

# Each command with the arguments it needs to get as far as reading its config.
COMMANDS = {
    "run": ["run", "bundle"],
    "watch": ["watch", "--once"],
    "demo": ["demo"],
    "review list": ["review", "list"],
    "review show": ["review", "show", "1"],
    "review approve": ["review", "approve", "1", "--by", "ann", "--reason", "x"],
    "rollback": ["rollback", "1"],
    "retire": ["retire", "task"],
    "predict": ["predict", "--image", "{config}", "--question", "what?"],
    "probe": ["probe", "bundle", "--out", "out"],
    "expand": ["expand", "bundle", "--plan", "probe.json", "--out", "out"],
    "evaluate": ["evaluate", "state", "--out", "out"],
    "bench": ["bench", "--suite", "coin-mini", "--out", "out"],
    "tune": ["tune", "--pilot", "bundle", "--out", "out"],
    "base build": ["base", "build"],
    "doctor": ["doctor"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_typo_in_the_config_is_one_clean_error_line_and_exit_2(command: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative outputs, if a command wrongly got that far, stay in here
    config = tmp_path / "typo.yaml"
    config.write_text("moe:\n  top_kk: 1\n")  # top_k
    args = [a.format(config=config) for a in COMMANDS[command]]
    result = CliRunner().invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.splitlines() == [f"error: {config}: moe.top_kk: Extra inputs are not permitted"]
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["typo.yaml"]  # nothing written before the check
