"""A task smaller than one checkpoint interval of the default config still expands (no checkpoint falls due)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cmoe.config import CmoeConfig
from cmoe.data.validate import ValidatedBundle
from cmoe.model.state import read_manifest
from cmoe.stages.expand import run_expand


def test_a_task_shorter_than_one_checkpoint_interval_expands(make_cfg: Callable[..., CmoeConfig],
                                                              suite: list[ValidatedBundle], tmp_path: Path) -> None:
    default_every = CmoeConfig().expand.checkpoint_every  # tiny_test_config checkpoints every 2 steps
    cfg = make_cfg(expand={"checkpoint_every": default_every})
    bundle = suite[0]
    steps = cfg.expand.epochs * (bundle.counts["train"] // cfg.expand.batch_size)
    assert 0 < steps < default_every  # the case under test: the run ends before its first checkpoint

    result = run_expand(cfg, bundle, None, None, tmp_path / "expand")
    assert result.train["steps"] == steps
    assert read_manifest(Path(result.state_dir))["tasks"] == [bundle.name]
    assert not (tmp_path / "expand" / "checkpoints").exists()
