"""`cmoe tune`: choose `probe.tau_scale` on a pilot sequence before a rollout.

Every value of `tune.tau_scales` learns the pilot bundles in order as a throwaway lineage in its
own home (`OUT/points/tau-<value>/`), with bench's `cmoe` sequence runner (cmoe.stages.bench), and
gives one point: parameters added over the sequence vs Avg (the mean final accuracy).

The rule: among the points whose Avg is within `tune.max_avg_drop` points of the best Avg, the one
that adds the fewest parameters (ties: the higher Avg, then the earlier grid value). Such a point
is always on the Pareto front: a point with fewer parameters and a higher Avg would be within the
drop too, and would be chosen instead.

The locator temperature is not swept: the locator routes by the argmin of its z-scored errors,
which no temperature changes, so routing and Avg are the same at every temperature; it only
rescales the reported confidence and margin.

Writes OUT/tune.json (every point and the choice), OUT/tune.md (the table), OUT/pareto.png and
OUT/config.yaml: the input config with `probe.tau_scale` set to the chosen value.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from cmoe.config import CmoeConfig, config_with
from cmoe.data.validate import ValidatedBundle
from cmoe.files import write_text_atomic
from cmoe.stages.bench import run_sequence
from cmoe.stages.common import base_dir
from cmoe.stages.report import TextTable, cell

RULE = "fewest params added among the points whose Avg is within tune.max_avg_drop of the best"


@dataclass
class TunePoint:
    """One `probe.tau_scale` over the pilot sequence."""

    tau_scale: float
    avg_acc: float  # mean final accuracy over the pilot tasks, percent
    params_added: int  # over the whole sequence
    experts_added: int
    bwt: float | None
    locator_acc: float | None
    wall_s: float


@dataclass
class TuneResult:
    """Every point, the chosen one and why; JSON-serialisable."""

    tasks: list[str]
    points: list[TunePoint]
    chosen: float  # the chosen tau_scale
    rule: str
    reason: str
    config_yaml: str  # the input config with probe.tau_scale = chosen
    report_json: str
    table_md: str
    pareto_png: str


def run_tune(cfg: CmoeConfig, bundles: list[ValidatedBundle], out: Path,
             config_path: str | Path | None = None) -> TuneResult:
    """Sweep `cfg.tune.tau_scales` over the pilot `bundles` into `out`; the config file at `config_path`
    (the defaults when None) is the one written back with the chosen value. Nothing is written
    without a bundle (ValueError) or a base (StageError)."""
    if not bundles:
        raise ValueError("give at least one pilot bundle")
    base = base_dir(cfg).resolve()  # every point's own home learns on this one base
    out = Path(out)
    points = []
    for tau_scale in cfg.tune.tau_scales:
        where = out / "points" / f"tau-{tau_scale:g}"
        shutil.rmtree(where, ignore_errors=True)  # a throwaway lineage: never resumed from an earlier sweep
        point = cfg.model_copy(deep=True)
        point.home = where / "home"
        point.base.path = str(base)
        point.probe.tau_scale = tau_scale
        entry = run_sequence(point, "cmoe", bundles, where / "work")
        points.append(TunePoint(tau_scale, entry["avg_acc"], sum(entry["params_added"]), sum(entry["experts_added"]),
                                entry["bwt"], entry["locator_acc"], entry["wall_s"]))
    i, reason = choose(points, cfg.tune.max_avg_drop)
    result = TuneResult([b.name for b in bundles], points, points[i].tau_scale, RULE, reason,
                        str(out / "config.yaml"), str(out / "tune.json"), str(out / "tune.md"), str(out / "pareto.png"))
    text = config_with(config_path, {"probe.tau_scale": points[i].tau_scale})
    write_text_atomic(Path(result.config_yaml), f"# cmoe tune: {reason}\n{text}")
    write_text_atomic(Path(result.table_md), table(result).markdown() + f"\n\nChosen: {reason}\n")
    plot_pareto(points, i, cfg.tune.max_avg_drop, Path(result.pareto_png))
    write_text_atomic(Path(result.report_json), json.dumps(asdict(result), indent=2))
    return result


def choose(points: list[TunePoint], max_avg_drop: float) -> tuple[int, str]:
    """The index of the point the rule picks (RULE; ties: higher Avg, then grid order) and why, in words."""
    best = max(p.avg_acc for p in points)
    near = [i for i, p in enumerate(points) if p.avg_acc >= best - max_avg_drop]
    i = min(near, key=lambda k: (points[k].params_added, -points[k].avg_acc, k))
    p = points[i]
    return i, (f"tau_scale {p.tau_scale:g}: {p.params_added:,} params added at Avg {p.avg_acc:.1f} %, the fewest "
               f"of the {len(near)} point(s) within {max_avg_drop:g} points of the best Avg ({best:.1f} %)")


def table(result: TuneResult) -> TextTable:
    """One row per point; the chosen one marked."""
    return TextTable(
        ["tau_scale", "Avg %", "params added", "experts added", "BWT", "locator %", "wall s", "chosen"],
        [[f"{p.tau_scale:g}", cell(p.avg_acc), f"{p.params_added:,}", str(p.experts_added), cell(p.bwt, "+.1f"),
          cell(p.locator_acc), f"{p.wall_s:.0f}", "yes" if p.tau_scale == result.chosen else ""]
         for p in result.points])


def pareto_front(points: list[TunePoint]) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer or equal params, higher or equal Avg)."""
    def beaten(p: TunePoint) -> bool:
        return any(q.params_added <= p.params_added and q.avg_acc >= p.avg_acc
                   and (q.params_added, q.avg_acc) != (p.params_added, p.avg_acc) for q in points)

    return sorted((i for i, p in enumerate(points) if not beaten(p)), key=lambda i: points[i].params_added)


def plot_pareto(points: list[TunePoint], chosen: int, max_avg_drop: float, path: Path) -> None:
    """Params added vs Avg, one labelled dot per tau_scale, the Pareto front, the band the rule accepts, the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [p.params_added for p in points], [p.avg_acc for p in points]
    ax.scatter(xs, ys, color="tab:blue", zorder=2)
    for p in points:
        ax.annotate(f"tau_scale {p.tau_scale:g}", (p.params_added, p.avg_acc), textcoords="offset points", xytext=(6, 4),
                    fontsize="small")
    front = pareto_front(points)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:blue", alpha=0.5, label="Pareto front")
    ax.axhline(max(ys) - max_avg_drop, color="grey", linestyle="--", linewidth=1,
               label=f"best Avg - {max_avg_drop:g} (tune.max_avg_drop)")
    ax.scatter([xs[chosen]], [ys[chosen]], s=220, marker="*", color="tab:red", zorder=3,
               label=f"chosen: tau_scale {points[chosen].tau_scale:g}")
    ax.margins(0.15)  # room for the labels of the outermost points
    ax.set_xlabel("params added over the pilot sequence")
    ax.set_ylabel("Avg (mean final accuracy) %")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
