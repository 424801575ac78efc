"""The registry against a real MLflow (sqlite + local artifacts) with a small fake state directory."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
import pytest
from PIL import Image

from cmoe.config import CmoeConfig
from cmoe.registry import CANDIDATE, CHAMPION, Registry, RegistryError, Verdict


_BASE: list[Path] = []  # the session's tiny base, for fake_state (set by the fixture below)


@pytest.fixture(autouse=True, scope="module")
def _share_base(base_dir: Path) -> None:
    _BASE[:] = [base_dir]


def fake_state(root: Path, tasks: list[str]) -> Path:
    """A complete CMoE state (base copied, manifest, deltas) that learned `tasks` without training:
    what the registry stores and verifies, at the cost of a second."""
    from cmoe.config import tiny_test_config
    from cmoe.model.cmoe_layer import add_task
    from cmoe.model.state import save_state
    from cmoe.stages.common import open_lineage

    cfg = tiny_test_config(root.parent / "state-home")
    cfg.base.path = str(_BASE[0])
    model, _ = open_lineage(cfg, None)
    for task in tasks:
        add_task(model, task)
    return save_state(model, root, copy_base=True)


RECORDED_TOKENS = 5  # the registering config's eval.max_new_tokens (not the default)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def registry(home: Path) -> Registry:
    return Registry(CmoeConfig(home=home, eval={"max_new_tokens": RECORDED_TOKENS}))


def register(reg: Registry, tmp: Path, task: str, parent: int | None, acc: dict[str, float]) -> int:
    run = reg.start_task_run(f"key-{task}", task, f"sha-{task}", parent, {"gate": {"max_forgetting": 5.0}})
    reg.log_stage(run, "evaluate", {"acc": acc, "bwt": -1.0, "note": "text is not a metric"})
    return reg.register_candidate(
        run, fake_state(tmp / task, list(acc)), key=f"key-{task}", task=task, bundle_uri=f"/inbox/{task}",
        bundle_sha256=f"sha-{task}", parent_version=parent, acc=acc,
        metrics={"bwt": -1.0, "forgetting": {"color": 2.0}}, gate={"avg_acc": 80.0}, tags={"prefect_flow_run_id": "x"})


def test_lineage_decisions_and_rollback(registry: Registry, tmp_path: Path) -> None:
    assert registry.champion() is None and registry.versions() == []
    v1 = register(registry, tmp_path, "color", None, {"color": 90.0})
    assert v1 == 1 and registry.aliases() == {CANDIDATE: 1}
    assert [p.version for p in registry.pending_reviews()] == [1]
    # Same arrival registered again (a resumed run): the same version, no duplicate.
    assert register(registry, tmp_path / "again", "color", None, {"color": 90.0}) == 1

    registry.decide_version(v1, "approved", "ann", "looks good")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # a fresh process has other globals
    champ = registry.champion()
    assert champ is not None and champ.version == 1 and champ.acc == {"color": 90.0}
    assert json.loads((champ.state_dir / "cmoe.json").read_text())["tasks"] == ["color"]
    assert registry.aliases() == {CHAMPION: 1}
    with pytest.raises(RegistryError, match="already approved"):
        registry.decide_version(v1, "rejected", "bob", "changed my mind")

    v2 = register(registry, tmp_path, "shape", v1, {"color": 70.0, "shape": 80.0})
    v3 = register(registry, tmp_path, "count", v1, {"color": 88.0, "count": 60.0})
    registry.decide_version(v2, "rejected", "bob", "forgets color")
    assert registry.champion().version == 1  # reject leaves the champion alone
    registry.decide_version(v3, "approved", "ann", "ok")
    info = registry.version(v2)
    assert (info.decision, info.decided_by, info.reason, info.parent_version) == ("rejected", "bob", "forgets color", 1)
    assert info.gate == {"avg_acc": 80.0} and info.metrics == {"bwt": -1.0, "forgetting.color": 2.0}
    assert info.tags["prefect_flow_run_id"] == "x"
    assert [v.version for v in registry.lineage(v3)] == [1, 3]
    assert registry.processed_bundle_hashes() == {"sha-color", "sha-shape", "sha-count"}
    assert registry.pending_reviews() == []

    v4 = register(registry, tmp_path, "letter", v1, {"color": 88.0, "letter": 50.0})
    with pytest.raises(RegistryError, match="champion is now 3"):
        registry.decide_version(v4, "approved", "ann", "stale parent")
    with pytest.raises(RegistryError, match="never approved"):
        registry.rollback(v2)
    assert registry.rollback(v1) == 3 and registry.champion().version == 1


def with_champion(reg: Registry, tmp: Path) -> Path:
    """Make sure a champion exists (registering one if this module has none yet); a red PNG to ask about."""
    if reg.champion() is None:
        reg.decide_version(register(reg, tmp, "color", None, {"color": 90.0}), "approved", "a", "b")
    png = tmp / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)
    return png


def test_champion_pyfunc_answers_rows(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`models:/cmoe@champion` loads without unpickling anything and answers image + question rows."""
    import mlflow.pyfunc

    seen = {}

    def predict_rows(cfg: CmoeConfig, state_dir: Path, images: list, questions: list[str]) -> list[dict]:
        seen["state"] = json.loads((Path(state_dir) / "cmoe.json").read_text())
        seen["max_new_tokens"] = cfg.eval.max_new_tokens
        return [{"answer": "red" if im.getpixel((0, 0)) == (255, 0, 0) else "?", "task": "color", "confidence": 0.9,
                 "margin": 0.8} for im in images]

    monkeypatch.setattr("cmoe.stages.predict.predict_rows", predict_rows)
    png = with_champion(registry, tmp_path)
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}@champion")
    out = model.predict(pd.DataFrame({"image": [str(png), png.read_bytes()], "question": ["what color?"] * 2}))
    assert list(out.columns) == ["answer", "task", "confidence", "margin"]
    assert list(out["answer"]) == ["red", "red"] and seen["state"]["format_version"] == 1
    assert seen["max_new_tokens"] == RECORDED_TOKENS  # decoding settings recorded with the model
    assert registry.predict("models:/cmoe@champion", [str(png)], ["what color?"]) == [
        {"answer": "red", "task": "color", "confidence": 0.9, "margin": 0.8}]
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name}@champion"))
    assert not list(model_dir.rglob("*.pkl"))  # models-from-code: nothing to unpickle


def test_predict_through_the_registry_decodes_as_the_callers_config_says(
        registry: Registry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cmoe predict --config` passes its eval section to the pyfunc, over what was recorded at registration."""
    seen = {}

    def predict_rows(cfg: CmoeConfig, state_dir: Path, images: list, questions: list[str]) -> list[dict]:
        seen["eval"] = cfg.eval.model_dump()
        return [{"answer": "?", "task": "color", "confidence": 0.5, "margin": 0.1} for _ in images]

    monkeypatch.setattr("cmoe.stages.predict.predict_rows", predict_rows)
    png = with_champion(registry, tmp_path)
    caller = Registry(CmoeConfig(home=home, eval={"max_new_tokens": 3, "batch_size": 2}))
    caller.predict("models:/cmoe@champion", [str(png)], ["what color?"])
    assert seen["eval"] == {"max_new_tokens": 3, "batch_size": 2}


def test_predict_refuses_a_version_whose_logged_model_code_is_not_the_installed_one(
        registry: Registry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading runs the version's own copy of model_code.py: a copy changed in the artifact store never runs."""
    ran: list[object] = []
    monkeypatch.setattr("cmoe.stages.predict.predict_rows", lambda *args: ran.append(args) or [])
    png = with_champion(registry, tmp_path)
    logged = list((home / "mlartifacts").rglob("model_code.py"))  # every version's copy in the artifact store
    originals = {f: f.read_bytes() for f in logged}
    try:
        for f in logged:
            f.write_bytes(originals[f] + b"\nimport os  # injected\n")
        with pytest.raises(RegistryError, match=r"refusing to load models:/cmoe@champion: its model code "
                                                r"model_code.py \(sha256 \w+…\) differs from the installed"):
            registry.predict("models:/cmoe@champion", [str(png)], ["what color?"])
    finally:
        for f, data in originals.items():
            f.write_bytes(data)
    assert logged and ran == []  # refused before MLflow ran any of it
    assert registry.predict("models:/cmoe@champion", [str(png)], ["what color?"]) == []  # the untouched copy loads


@pytest.fixture
def fresh(tmp_path: Path) -> Registry:
    """A registry of its own (no champion yet), for tests of one version's decision."""
    return Registry(CmoeConfig(home=tmp_path / "home"))


def test_the_first_answer_decides_and_every_later_one_is_refused_naming_it(fresh: Registry, tmp_path: Path) -> None:
    version = register(fresh, tmp_path, "color", None, {"color": 90.0})
    assert fresh.recorded_decision(version) is None
    fresh.decide_version(version, "rejected", "ann", "forgets")
    for decision, by in (("approved", "bob"), ("rejected", "ann")):  # another answer, or the same one again
        with pytest.raises(RegistryError, match=r"version 1 is already rejected \(by ann: forgets\)"):
            fresh.decide_version(version, decision, by, "late")
    info = fresh.recorded_decision(version)
    assert info is not None and (info.decision, info.decided_by, info.reason) == ("rejected", "ann", "forgets")


def test_answers_racing_for_one_version_record_exactly_one(fresh: Registry, tmp_path: Path) -> None:
    """Four answers at once, while two waiting runs look for the decision (and finish writing it)."""
    version = register(fresh, tmp_path, "color", None, {"color": 90.0})
    names = ["ann", "bob", "cid", "dee"]
    start = threading.Barrier(len(names) + 2)

    def answer(by: str) -> str:
        start.wait()
        try:
            fresh.decide_version(version, "rejected", by, f"{by} was here")
        except RegistryError as refused:
            return str(refused)
        return "recorded"

    def wait_for_decision() -> str:
        start.wait()
        while (info := fresh.recorded_decision(version)) is None:
            pass
        return info.decided_by

    with ThreadPoolExecutor(len(names) + 2) as pool:
        waiters = [pool.submit(wait_for_decision) for _ in range(2)]
        answers = dict(zip(names, pool.map(answer, names)))
        seen = [w.result() for w in waiters]
    winner = fresh.version(version).decided_by
    assert answers[winner] == "recorded" and seen == [winner, winner]
    assert all(answers[by] == f"version 1 is already rejected (by {winner}: {winner} was here)"
               for by in names if by != winner)


def test_a_decision_cut_short_by_a_crash_stands_and_is_finished(fresh: Registry, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    version = register(fresh, tmp_path, "color", None, {"color": 90.0})

    def unreachable(*args: object) -> None:
        raise MlflowException("registry unreachable")

    monkeypatch.setattr(fresh.client, "set_registered_model_alias", unreachable)  # dies before `champion` moves
    with pytest.raises(MlflowException):
        fresh.decide_version(version, "approved", "ann", "looks good")
    monkeypatch.undo()
    assert fresh.version(version).decision == "pending_review" and fresh.champion() is None
    with pytest.raises(RegistryError, match=r"already approved \(by ann: looks good\)"):
        fresh.decide_version(version, "rejected", "bob", "too late")
    info = fresh.recorded_decision(version)  # what a waiting run (or the next one) does: finish it
    assert info is not None and (info.decision, info.decided_by) == ("approved", "ann")
    assert fresh.aliases() == {CHAMPION: version}


def test_a_registration_cut_short_by_a_crash_is_finished_by_the_rerun(fresh: Registry, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed once its version is registered, before the card and the `candidate` alias: the re-run of the
    same arrival finds the version by its key and finishes it; nothing is registered twice."""
    run = fresh.start_task_run("key-color", "color", "sha-color", None, {})
    state = fake_state(tmp_path / "color", ["color"])

    def registration() -> int:
        return fresh.register_candidate(run, state, key="key-color", task="color", bundle_uri="/inbox/color",
                                        bundle_sha256="sha-color", parent_version=None, acc={"color": 90.0},
                                        metrics={}, gate={}, card="# color: the card")

    def unreachable(*args: object, **kwargs: object) -> None:
        raise MlflowException("registry unreachable")

    monkeypatch.setattr(fresh.client, "update_model_version", unreachable)  # dies right after registering
    with pytest.raises(MlflowException):
        registration()
    monkeypatch.undo()
    assert (fresh.version(1).card, fresh.aliases()) == ("", {})
    assert registration() == 1
    assert [v.version for v in fresh.versions()] == [1] and fresh.aliases() == {CANDIDATE: 1}
    assert fresh.version(1).card == "# color: the card"


def test_an_expansion_plan_is_decided_once(fresh: Registry) -> None:
    run = fresh.start_task_run("key-plan", "plan", "sha-plan", None, {})
    fresh.set_plan_review(run, "pending")
    assert [p.run_id for p in fresh.pending_plans()] == [run] and fresh.plan_decision(run) is None
    assert fresh.decide_plan(run, "approved", "ann", "small") == Verdict("approved", "ann", "small")
    with pytest.raises(RegistryError, match=r"its expansion plan is already approved \(by ann: small\)"):
        fresh.decide_plan(run, "rejected", "bob", "too big")
    assert fresh.plan_decision(run) == Verdict("approved", "ann", "small") and fresh.pending_plans() == []


def test_an_unreachable_registry_is_an_error_never_no_champion(tmp_path: Path) -> None:
    """A champion that cannot be read must not read as "none yet": the next run would train from the base."""
    from cmoe.net import free_port

    down = f"http://reviewer:SENTINEL_PW_7@127.0.0.1:{free_port()}"  # nothing listens there
    # no retries: fail at once, not after the default's back-off (tests/test_unreachable.py tests that)
    reg = Registry(CmoeConfig(home=tmp_path, registry={"tracking_uri": down, "request_retries": 0}))
    for read in (reg.aliases, reg.versions, reg.champion, reg.pending_reviews):
        with pytest.raises(RegistryError, match="cannot read model 'cmoe'") as err:
            read()
        assert "SENTINEL_PW_7" not in str(err.value) and "reviewer:***@127.0.0.1" in str(err.value)


def test_a_version_whose_stored_state_is_incomplete_is_never_promoted(fresh: Registry, tmp_path: Path) -> None:
    version = register(fresh, tmp_path, "color", None, {"color": 90.0})
    stored = next((tmp_path / "home" / "mlartifacts").rglob("tasks/color/router.safetensors"))
    stored.unlink()  # the artifact store lost a delta (a partial upload, a pruned bucket)
    with pytest.raises(RegistryError, match="version 1 cannot become champion: .*router.safetensors: delta file missing"):
        fresh.decide_version(version, "approved", "ann", "looks good")
    info = fresh.version(version)
    assert info.decision == "pending_review" and CHAMPION not in fresh.aliases()
    assert fresh.decide_version(version, "rejected", "ann", "its state is broken").decision == "rejected"


def test_the_config_logged_as_params_carries_no_password(fresh: Registry) -> None:
    config = {"registry": {"tracking_uri": "postgresql://cmoe:SENTINEL_PW_9@db:5432/mlflow"}, "inbox": "s3://b/in/"}
    run_id = fresh.start_task_run("key-secret", "color", "sha", None, config)
    params = fresh.client.get_run(run_id).data.params
    assert params["registry.tracking_uri"] == "postgresql://cmoe:***@db:5432/mlflow"
    assert all("SENTINEL_PW_9" not in v for v in params.values())


def test_the_experiment_opens_on_its_training_runs(fresh: Registry) -> None:
    """MLflow 3's UI shows an experiment tagged custom_model_development as runs, not as a GenAI app."""
    tags = fresh.client.get_experiment(fresh.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_system_metrics_sample_the_machine_onto_the_run_while_the_block_runs(tmp_path: Path) -> None:
    from .conftest import wait_for

    reg = Registry(CmoeConfig(home=tmp_path, registry={"system_metrics_s": 0.2}))
    run_id = reg.stage_run(reg.start_task_run("key-sys", "color", "sha", None, {}), "expand")
    with reg.system_metrics(run_id):
        wait_for(lambda: "system/cpu_utilization_percentage" in reg.client.get_run(run_id).data.metrics,
                 timeout=60, what="a system-metrics sample")


def test_a_decision_rewrites_only_the_decision_section_of_the_model_card(fresh: Registry, tmp_path: Path) -> None:
    from cmoe.registry.model_card import with_decision

    version = register(fresh, tmp_path, "color", None, {"color": 90.0})
    card = with_decision("# color\n\nwhat it learned\n\n", "pending_review", "", "")
    fresh.client.update_model_version(fresh.model_name, str(version), card)
    fresh.decide_version(version, "rejected", "ann", "forgets shape")
    assert fresh.version(version).card == "# color\n\nwhat it learned\n\n<!-- cmoe:decision -->\n## Decision\n\n" \
                                          "**rejected** by **ann**: forgets shape"
