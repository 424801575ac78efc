"""Suite-wide set-up: the CLI's offline environment, and one tiny suite + base per session."""

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmoe.env import apply_defaults

apply_defaults()
# One intra-op thread for this process and every process a test starts (they inherit the
# environment): the tiny models gain nothing from a second thread, and on a shared two-core machine
# a thread pool waits on whichever core a neighbour holds — the tiny base built in 61 s with two
# threads beside a neighbour's load, in 12 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The first two bundles of a tiny coin-mini (64 train / 16 test rows each) and its corpus."""
    from cmoe.data.synth import synth_suite

    # coin-mini's renderer only (varied_share 0): the tiny bases' recipes were measured on it, and at
    # 64 pretraining images the varied half would only take examples from each attribute
    return synth_suite(tmp_path_factory.mktemp("suite"), n_train=64, n_test=16, n_pretrain=64, varied_share=0.0)[:2]


@pytest.fixture(scope="session")
def tiny_base(tiny_suite: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained base (tiny_test_config's recipe), built once per session for every test."""
    from cmoe.config import tiny_test_config
    from cmoe.stages.pretrain import build_base

    home = tmp_path_factory.mktemp("base-home")
    cfg = tiny_test_config(home)
    built = build_base(cfg.base, home / "base", corpus=tiny_suite[0].parent / "pretrain", cache_dir=home / "cache",
                       moe=cfg.moe)
    return Path(built.path)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A local port that accepts connections (the kernel's backlog) and never answers a byte: a hung service."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


# Long modules that build their own lineages and share only cheap session fixtures of their folder (a
# local Prefect API, moto S3) with it: each is a unit of its own, so that their folder (one worker's
# work otherwise: ~700 s for tests/orchestration; 380 s with the first three apart) does not end the
# run alone.
OWN_UNITS = {f"tests/orchestration/{name}.py" for name in (
    "test_rehearsal_free", "test_retire", "test_secrets_flow", "test_compact_flow", "test_killed_stages")}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under `--dist loadscope` (`make test`), each folder of tests/ is one unit of work for one
    worker: a folder's conftest builds its costly session fixtures (a trained lineage, a watched
    inbox, the service stack) once, which a module-by-module split would build on both workers.
    The modules of OWN_UNITS are units of their own."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            if module in OWN_UNITS:
                return module
            path = module.split("/")
            return "/".join(path[:2]) if len(path) > 2 else path[0]  # tests/<folder>, or a top-level module

    return FolderScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that train lineages or start services (`slow`, `services`) first: under several workers
    (`make test`) the folders holding the long ones then start first, beside the short ones."""
    heavy = {item.nodeid.split("::")[0] for item in items
             if item.get_closest_marker("slow") or item.get_closest_marker("services")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in heavy)  # stable: a module stays in order
