"""One task arrival validates its bundle once and hashes each of its files once (issue: one validated bundle)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import cmoe.data.bundle as bundle_module
import cmoe.data.validate as validate_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def test_continual_task_validates_and_hashes_its_bundle_once(suite: list[Path], write_config: Callable[..., str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.continual import continual_task

    bundle = suite[0]
    validations: list[Path] = []
    hashed: Counter[str] = Counter()
    real_validate, real_hash = validate_module.validate_bundle, bundle_module.file_sha256

    def counting_validate(root: Path, **kw):  # noqa: ANN202
        validations.append(Path(root))
        return real_validate(root, **kw)

    def counting_hash(path: Path) -> str:
        if Path(path).is_relative_to(bundle):
            hashed[str(Path(path).relative_to(bundle))] += 1
        return real_hash(path)

    monkeypatch.setattr(validate_module, "validate_bundle", counting_validate)
    monkeypatch.setattr(bundle_module, "file_sha256", counting_hash)
    outcome = continual_task(str(bundle), write_config("once"))
    assert outcome.decision == "approved"
    assert validations == [bundle]
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(hashed) == files and set(hashed.values()) == {1}
