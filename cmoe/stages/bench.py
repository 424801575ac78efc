"""`cmoe bench`: train a task sequence with each method in one harness and compare them.

Methods (same base, same trainer, same budget per task, same evaluation):
- `cmoe`          PGKE probe decides where to grow; one router + one locator VAE per task (PTL).
- `cmoe-compact`  `cmoe`, with the lineage compacted (`cmoe compact`, the `compact` config) after every task.
- `naive-expand`  one new expert in every CMoE layer per task, no probe; per-task routers + PTL.
- `single-router` experts grow like naive-expand, but one shared router is trained on every task.
- `seq-ft`        no growth: the upcycled experts and one shared router are fine-tuned task by task.
- `joint`         all tasks' training data at once (not rehearsal-free): the upper bound.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cmoe.config import CmoeConfig
from cmoe.data.validate import ValidatedBundle, open_bundle
from cmoe.model.cmoe_layer import add_task, train_all_experts
from cmoe.model.routing import route
from cmoe.stages import metrics
from cmoe.stages.compact import run_compact
from cmoe.stages.common import keep_task_eval_set, load_train, moe_loss, open_lineage, task_eval_set
from cmoe.stages.evaluate import evaluate_model, plot_matrix, run_evaluate
from cmoe.stages.expand import expand_model, run_expand
from cmoe.stages.probe import naive_plan, run_probe
from cmoe.stages.report import Row, TextTable, accuracy_table, cell
from cmoe.stages.trainer import TrainSpec, train

METHODS = ("cmoe", "cmoe-compact", "naive-expand", "single-router", "seq-ft", "joint")


def run_sequence(cfg: CmoeConfig, method: str, bundles: list[ValidatedBundle], out: Path) -> dict:
    """Learn `bundles` in order with `method`; the results.json entry of that method.

    As in production, each task's evaluation set is kept (under `out/evalsets`) when it is learned
    and re-testing reads only those.
    """
    if method == "seq-ft":
        return run_seq_ft(cfg, bundles, out)
    t0 = time.perf_counter()
    parent: Path | None = None
    spent: Path | None = None  # the folder of `parent` to delete once the next state is built on it
    history: list[dict[str, float]] = []
    report = None
    experts, deltas, removed, probe_s, expand_s = [], [], [], 0.0, 0.0
    probed = method in ("cmoe", "cmoe-compact")
    for i, bundle in enumerate(bundles):
        step = out / f"{i + 1:02d}-{bundle.name}"
        t_probe = time.perf_counter()
        if probed:
            plan = run_probe(cfg, bundle, parent, step / "probe")
        else:  # naive-expand, single-router: one expert in every CMoE layer, no probe
            plan = naive_plan(cfg, bundle, parent, step / "probe")
        probe_s += time.perf_counter() - t_probe
        grew_delta = plan.growth == "delta"
        experts.append(0 if grew_delta else sum(plan.plan.values()))
        deltas.append(len(plan.plan) if grew_delta else 0)
        variant = "single-router" if method == "single-router" else "cmoe"
        kept = keep_task_eval_set(cfg, bundle, str(out / "evalsets"))
        expanded = run_expand(cfg, bundle, parent, plan, step / "expand", eval_set=kept, copy_base=False,
                              variant=variant)
        expand_s += expanded.wall_s
        state = Path(expanded.state_dir)
        folder = state.parent
        if method == "cmoe-compact":  # what a team running `cmoe compact` after every task would keep
            compacted = run_compact(cfg, state, step / "compact")
            removed.append(compacted.retired + compacted.merged)
            shutil.rmtree(folder)
            state = folder = Path(compacted.state_dir)  # its compact.json beside it stays
        report = run_evaluate(cfg, state, step / "eval", history)
        history.append(report.acc)
        if spent is not None:
            shutil.rmtree(spent)  # keep only the newest state of the lineage on disk
        parent, spent = state, folder
    assert report is not None
    # Experts and deltas each task added (and compaction removed), and PGKE's price: probe wall time
    # as a share of the expansions'.
    return _entry(report.matrix, report.locator_acc, report.params_total, report.params_added, t0,
                  experts_added=experts, delta_layers=deltas, experts_removed=removed or None,
                  probe_cost=probe_s / expand_s if probed else None)


def run_seq_ft(cfg: CmoeConfig, bundles: list[ValidatedBundle], out: Path) -> dict:
    """Sequential fine-tuning of the upcycled experts + one router, no growth (kept in memory:
    the state format stores only frozen upcycled copies, which seq-ft does not keep frozen)."""
    t0 = time.perf_counter()
    model, processor = open_lineage(cfg, None, single_router=True)
    history: list[dict[str, float]] = []
    report = None
    eval_sets = [task_eval_set(cfg, b) for b in bundles]
    for i, bundle in enumerate(bundles):
        step = out / f"{i + 1:02d}-{bundle.name}"
        expand_model(cfg, model, processor, bundle, None, step / "expand", variant="seq-ft")
        report = evaluate_model(cfg, model, processor, eval_sets[: i + 1], step / "eval", history)
        history.append(report.acc)
    assert report is not None
    return _entry(report.matrix, None, report.params_total, report.params_added, t0)


def run_joint(cfg: CmoeConfig, bundles: list[ValidatedBundle], out: Path) -> dict:
    """Train every task's data together (the upper bound), then evaluate each task."""
    t0 = time.perf_counter()
    model, processor = open_lineage(cfg, None, single_router=True)
    data = []
    for bundle in bundles:
        data += load_train(cfg, bundle, model, processor).encoded
        add_task(model, bundle.name)
    train_all_experts(model)
    # One pass over the union costs what the sequential methods spend on all tasks together.
    spec = TrainSpec(epochs=cfg.expand.epochs, batch_size=cfg.expand.batch_size, lr=cfg.expand.lr,
                     seed=cfg.expand.seed, deepspeed_config=cfg.expand.deepspeed_config, desc="joint")
    with route(model, None):
        model.train()
        train(model, [p for p in model.parameters() if p.requires_grad], data, processor.collate, moe_loss, spec)
        model.eval()
    model.requires_grad_(False)
    report = evaluate_model(cfg, model, processor, [task_eval_set(cfg, b) for b in bundles], out / "eval", [])
    final = [report.acc[t] for t in report.tasks]
    matrix = [[None] * len(bundles) for _ in bundles[:-1]] + [final]
    entry = _entry(matrix, None, report.params_total, [0] * len(bundles), t0)
    entry.update(bwt=None, forgetting=None, maa=None, mft=None)  # one training, no sequence: not defined
    return entry


def _entry(matrix: list[list[float | None]], locator_acc: float | None, params_total: int,
           params_added: list[int], t0: float, experts_added: list[int] | None = None,
           delta_layers: list[int] | None = None, experts_removed: list[int] | None = None,
           probe_cost: float | None = None) -> dict:
    return {"acc_matrix": matrix, "avg_acc": metrics.avg_acc(matrix), "mfn": metrics.avg_acc(matrix),
            "bwt": metrics.bwt(matrix),
            "forgetting": metrics.forgetting(matrix), "maa": metrics.maa(matrix), "mft": metrics.mft(matrix),
            "locator_acc": locator_acc, "params_total": params_total, "params_added": params_added,
            "experts_added": experts_added or [0] * len(params_added),
            "delta_layers": delta_layers or [0] * len(params_added),
            "experts_removed": experts_removed or [0] * len(params_added), "probe_cost": probe_cost,
            "wall_s": time.perf_counter() - t0}


def mean_over_seeds(entries: list[dict]) -> dict:
    """One method's entries (one per seed) as one: every number the mean, `range` the [min, max] of each
    summary number (`params_added`: of its sum), `per_seed` the entries themselves."""
    def mean(values: list) -> float | int | None:
        if any(v is None for v in values):
            return None
        m = sum(values) / len(values)
        return int(m) if all(isinstance(v, int) for v in values) and m == int(m) else m

    def spread(values: list) -> list | None:
        return None if any(v is None for v in values) else [min(values), max(values)]

    per_task = ("params_added", "experts_added", "delta_layers", "experts_removed")  # one number per task
    summaries = [k for k in entries[0] if k != "acc_matrix" and k not in per_task]
    rows = zip(*(e["acc_matrix"] for e in entries))
    out = {"acc_matrix": [[mean(list(col)) for col in zip(*row)] for row in rows],
           **{k: mean([e[k] for e in entries]) for k in summaries},
           **{k: [mean(list(col)) for col in zip(*(e[k] for e in entries))] for k in per_task}}
    out["range"] = {**{k: spread([e[k] for e in entries]) for k in summaries},
                    **{k: spread([sum(e[k]) for e in entries]) for k in per_task}}
    out["per_seed"] = entries
    return out


def run_bench(cfg: CmoeConfig, uris: list[str], methods: list[str], out: Path, seeds: list[int] | None = None) -> dict:
    """Run every method over the bundles at `uris` once per training seed (`expand.seed`; default: the
    configured one); write results.json (per method the mean over seeds, their range, each seed's
    entry), results.md and plots into `out`."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    seeds = list(seeds) if seeds is not None else [cfg.expand.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds}: give one or more distinct seeds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundles = [open_bundle(uri, cache_dir=cfg.home / "cache") for uri in uris]  # validated once, for every method
    tasks = [b.name for b in bundles]
    results: dict = {"tasks": tasks, "seeds": seeds, "methods": {}}
    for method in methods:
        entries = []
        for seed in seeds:
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.expand.seed = seed  # probe split and init, expansion, locator fit, training order
            work = out / "work" / method / f"seed-{seed}"
            entries.append(run_joint(run_cfg, bundles, work) if method == "joint"
                           else run_sequence(run_cfg, method, bundles, work))
        entry = mean_over_seeds(entries)
        results["methods"][method] = entry
        plot_matrix(entry["acc_matrix"], tasks, out / f"{method}-accuracy.png")
        # Write after every method: a long benchmark that stops midway still leaves its results.
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    """The comparison table of results.json, as Markdown."""
    methods = results["methods"].items()
    summary = TextTable(
        ["method", "Avg (MFN) %", "MFT %", "BWT", "Forgetting", "MAA %", "locator %", "params total", "params added",
         "experts added", "delta layers", "experts removed", "probe cost", "wall s"],
        [[name, *(cell(m[k]) for k in ("avg_acc", "mft", "bwt", "forgetting", "maa", "locator_acc")),
          f"{m['params_total']:,.0f}", f"{sum(m['params_added']):,.0f}", per_task(m["experts_added"]),
          per_task(m.get("delta_layers")), per_task(m.get("experts_removed")), cell(m["probe_cost"], ".0%"), f"{m['wall_s']:.0f}"]
         for name, m in methods])
    final = accuracy_table(["method"], results["tasks"], [Row([name], m["acc_matrix"][-1]) for name, m in methods])
    return (f"Tasks, in order: {', '.join(results['tasks'])}\n\n{summary.markdown()}\n\n"
            f"Final accuracy per task (%):\n\n{final.markdown()}\n" + seeds_markdown(results))


def per_task(counts: list[float] | None) -> str:
    """Experts (or delta layers) per task, "2 / 1.3 / 0" (means over seeds to one decimal); "0" when
    none were (results written before a count existed: none)."""
    return " / ".join(f"{round(n, 1):g}" for n in counts) if counts and any(counts) else "0"


def seeds_markdown(results: dict) -> str:
    """With more than one seed: each summary's range over the seeds (the tables above are means)."""
    seeds = results.get("seeds", [])
    if len(seeds) < 2:
        return ""

    def span(r: list | None, spec: str = ".1f") -> str:
        return cell(None) if r is None else f"{cell(r[0], spec)} – {cell(r[1], spec)}"

    keys = ("avg_acc", "bwt", "forgetting", "maa", "locator_acc")
    table = TextTable(["method", "Avg %", "BWT", "Forgetting", "MAA %", "locator %", "params added"],
                      [[name, *(span(m["range"][k]) for k in keys), span(m["range"]["params_added"], ",.0f")]
                       for name, m in results["methods"].items()])
    return (f"\nMeans over seeds {', '.join(map(str, seeds))} (expand.seed); range [min – max] over them:\n\n"
            f"{table.markdown()}\n")


def bundles_in(folder: Path) -> list[str]:
    """The task bundles of a synthesised suite, in order (the pretraining corpus excluded)."""
    return [str(p) for p in sorted(Path(folder).glob("[0-9][0-9]-*")) if (p / "task.yaml").is_file()]
