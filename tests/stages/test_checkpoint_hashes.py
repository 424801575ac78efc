"""Resume checkpoints are torch pickles: the trainer hands DeepSpeed only files whose sha256 it recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmoe.stages.trainer import HASHES, CheckpointError, TrainSpec, train

from .ddp_train_script import build, collate, loss_fn

SPEC = dict(steps=6, batch_size=16, checkpoint_every=2, seed=5)


class Interrupt(RuntimeError):
    """Raised from on_log to stop a run the way a crash would."""


def interrupted(ckpt: Path, at: int = 5) -> None:
    """Train until step `at` and die there, leaving the checkpoints of steps 2 and 4 behind."""
    def stop(step: int, metrics: dict) -> None:
        if step == at:
            raise Interrupt

    model, data = build(5)
    with pytest.raises(Interrupt):
        train(model, [p for p in model.parameters() if p.requires_grad], data, collate, loss_fn,
              TrainSpec(**SPEC, checkpoint_dir=ckpt, log_every=1), stop)


def resume(ckpt: Path):
    model, data = build(5)
    return train(model, [p for p in model.parameters() if p.requires_grad], data, collate, loss_fn,
                 TrainSpec(**SPEC, checkpoint_dir=ckpt))


def test_every_checkpoint_file_is_recorded_by_its_sha256(tmp_path: Path) -> None:
    interrupted(tmp_path)
    hashes = json.loads((tmp_path / HASHES).read_text())
    assert sorted(hashes) == ["step2", "step4"]
    assert set(hashes["step4"]) == {str(p.relative_to(tmp_path / "step4"))
                                    for p in (tmp_path / "step4").rglob("*") if p.is_file()}
    assert resume(tmp_path).resumed_from_step == 4
    assert not tmp_path.exists()  # the hashes go with the checkpoints once the run is done


def test_a_tampered_byte_is_refused_before_anything_is_unpickled(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    interrupted(tmp_path)
    victim = sorted((tmp_path / "step4").rglob("*.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    loads: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load was called"))
    with pytest.raises(CheckpointError, match=rf"{victim.name}: sha256 .* differs from the recorded"):
        resume(tmp_path)
    assert not loads and victim.is_file()  # refused, and the evidence is kept for whoever looks


def test_a_file_planted_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    interrupted(tmp_path)
    (tmp_path / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="not written by this run"):
        resume(tmp_path)


def test_a_latest_tag_that_names_no_step_checkpoint_is_refused(tmp_path: Path) -> None:
    interrupted(tmp_path)
    (tmp_path / "latest").write_text("../elsewhere")
    with pytest.raises(CheckpointError, match="not a step checkpoint"):
        resume(tmp_path)
    (tmp_path / "latest").write_text("step3")  # unrecorded and older than step4: not what this run wrote last
    with pytest.raises(CheckpointError, match="older than the recorded step4"):
        resume(tmp_path)


def test_a_checkpoint_cut_short_before_its_hashes_were_recorded_is_never_loaded(tmp_path: Path) -> None:
    interrupted(tmp_path)
    hashes = json.loads((tmp_path / HASHES).read_text())
    del hashes["step4"]  # killed after DeepSpeed wrote step4, before its hashes were recorded
    (tmp_path / HASHES).write_text(json.dumps(hashes))
    assert resume(tmp_path).resumed_from_step == 2  # the newest recorded checkpoint
