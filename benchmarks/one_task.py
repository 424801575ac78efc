"""How far one coin-mini task gets over a cmoe lineage, by what trains and for how long.

    python -m benchmarks.one_task --task read-letter --epochs 8,16,32 --work runs/one-task

The tasks before `--task` are learned as cmoe learns them under `--config` (probe + expansion,
cached in `--work`), then the task itself is trained once per variant, epoch count and learning rate,
each from the same lineage:
- `experts`: the probe's plan grown as new experts (`expand.growth: experts`) and the task's router;
- `delta`: the probe's plan grown as cmoe's delta of the base experts (`expand.growth: delta`);
- `lora`: no new expert; a rank-`--rank` delta (LoRA, B zero-initialised) on the three projections
  of every expert the lineage has, task experts too, in every layer, trained with the task's
  router, evaluated in memory (the experiment that led to `delta`);
- `lora-plan`: the same delta on the experts of the probe's planned layers only;
- `finetune`: every expert of the lineage trains for this task, overwriting what earlier tasks
  learned (no method: what joint training may change, given to one task; also in memory).
Printed: accuracy on the task's test rows (locator routing), the mean training loss of the last
10 % of steps, the parameters the variant adds or changes (its router trains in every variant and
is not counted).
The measurement behind docs/method.md, choice 7.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cmoe.config import CmoeConfig, load_config
from cmoe.data.synth import synth_suite
from cmoe.data.validate import ValidatedBundle, open_bundle
from cmoe.model.cmoe_layer import add_task, cmoe_layers, train_all_experts
from cmoe.model.routing import route
from cmoe.stages.bench import bundles_in
from cmoe.stages.common import keep_task_eval_set, load_train, moe_loss, open_lineage, task_eval_set
from cmoe.stages.evaluate import evaluate_model, run_evaluate
from cmoe.stages.expand import expansion_spec, fit_locator, run_expand
from cmoe.stages.probe import ProbeReport, run_probe
from cmoe.stages.trainer import train


VARIANTS = ("experts", "delta", "lora", "lora-plan", "finetune")


class LowRankDelta(nn.Module):
    """`base(x) + x A^T B^T`: a frozen linear plus a trainable rank-r delta that starts at zero."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def lineage(cfg: CmoeConfig, bundles: list[ValidatedBundle], work: Path) -> Path | None:
    """Learn `bundles` in order as cmoe does, under `cfg` (reused when already in `work`); the last state."""
    parent = None
    for i, bundle in enumerate(bundles):
        step = work / "lineage" / f"{i + 1:02d}-{bundle.name}"
        state = step / "expand" / "state"
        if not state.exists():
            plan = run_probe(cfg, bundle, parent, step / "probe")
            kept = keep_task_eval_set(cfg, bundle, str(work / "evalsets"))
            run_expand(cfg, bundle, parent, plan, step / "expand", eval_set=kept, copy_base=False)
        parent = state
    return parent


def with_plan(cfg: CmoeConfig, bundle: ValidatedBundle, parent: Path | None, plan: ProbeReport,
              out: Path) -> tuple[float, float, int]:
    """cmoe's expansion of `bundle` by the probe's `plan`: (accuracy %, final loss, new parameters)."""
    kept = keep_task_eval_set(cfg, bundle, str(out.parent / "evalsets"))
    result = run_expand(cfg, bundle, parent, plan, out / "expand", eval_set=kept, copy_base=False)
    report = run_evaluate(cfg, Path(result.state_dir), out / "eval", [])
    return report.acc[bundle.name], result.train["mean_loss_last_10pct"], result.params_added


def add_delta(model: nn.Module, rank: int, layers: set[int] | None = None) -> list[nn.Parameter]:
    """Wrap every linear of every expert (of `layers`; default all) in a rank-`rank` delta; its parameters."""
    params: list[nn.Parameter] = []
    for i, layer in cmoe_layers(model).items():
        if layers is not None and i not in layers:
            continue
        for expert in layer.experts:
            for name, child in list(expert.named_children()):
                if isinstance(child, nn.Linear):
                    delta = LowRankDelta(child, rank)
                    setattr(expert, name, delta)
                    params += [delta.a, delta.b]
    return params


def unfreeze_experts(model: nn.Module) -> list[nn.Parameter]:
    """Let every expert train (what joint training changes, here for one task only); their parameters."""
    train_all_experts(model)
    return [p for layer in cmoe_layers(model).values() for p in layer.experts.parameters()]


def in_memory(cfg: CmoeConfig, bundle: ValidatedBundle, parent: Path | None, out: Path,
              change: Callable[[nn.Module], list[nn.Parameter]]) -> tuple[float, float, int]:
    """Train what `change` makes trainable plus the task's router, then evaluate, all in memory."""
    model, processor = open_lineage(cfg, parent)
    data = load_train(cfg, bundle, model, processor)
    torch.manual_seed(cfg.expand.seed)
    add_task(model, bundle.name)
    params = change(model)
    changed = sum(p.numel() for p in params)  # the router trains in every variant: not counted
    params += [layer.routers[-1] for layer in cmoe_layers(model).values()]
    spec = dataclasses.replace(expansion_spec(cfg, bundle.name, out), checkpoint_dir=None)
    with route(model, [bundle.name]):
        model.train()
        result = train(model, params, data.encoded, processor.collate, moe_loss, spec)
        model.eval()
    model.requires_grad_(False)
    fit_locator(model, processor, data, cfg)
    report = evaluate_model(cfg, model, processor, [task_eval_set(cfg, bundle)], out / "eval", [])
    return report.acc[bundle.name], result.mean_loss_last_10pct, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="read-letter", help="the coin-mini task under study")
    parser.add_argument("--epochs", default="8,16", help="expansion epochs to try, comma-separated")
    parser.add_argument("--variants", default="experts,lora", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--rank", type=int, default=8, help="rank of the lora variant's delta")
    parser.add_argument("--lr", default=None, help="expansion learning rates to try, comma-separated "
                        "(default: the config's expand.lr, expand.delta_lr for delta); not the lineage's")
    parser.add_argument("--config", type=Path, default=None, help="a cmoe config file (default: the defaults)")
    parser.add_argument("--work", type=Path, default=Path("runs/one-task"))
    args = parser.parse_args()
    cfg = load_config(args.config)
    suite = args.work / "suite"
    if not suite.exists():
        synth_suite(suite)
    bundles = [open_bundle(uri, cache_dir=cfg.home / "cache") for uri in bundles_in(suite)]
    names = [b.name for b in bundles]
    if args.task not in names or names.index(args.task) == 0:
        raise SystemExit(f"--task: choose one of {', '.join(names[1:])} (a task with a lineage before it)")
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    i = names.index(args.task)
    bundle, parent = bundles[i], lineage(cfg, bundles[:i], args.work)
    plan = run_probe(cfg, bundle, parent, args.work / args.task / "probe")
    print(f"{args.task} over {', '.join(names[:i])}; the probe's plan: {plan.plan}")
    rates = [float(r) for r in args.lr.split(",")] if args.lr else [None]
    print("| variant | epochs | lr | accuracy % | loss, last 10 % of steps | parameters added or changed |")
    print("|---|---|---|---|---|---|")
    for epochs, lr, variant in itertools.product([int(e) for e in args.epochs.split(",")], rates, variants):
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.expand.epochs = epochs
        if lr is not None:  # the rate of whatever trains: a delta's (expand.delta_lr) or the rest's
            run_cfg.expand.lr = run_cfg.expand.delta_lr = lr
        lr = run_cfg.expand.delta_lr if variant == "delta" else run_cfg.expand.lr
        out = args.work / args.task / f"{variant}-{epochs}-{lr:g}"
        if variant in ("experts", "delta"):
            run_cfg.expand.growth = variant
            acc, loss, n = with_plan(run_cfg, bundle, parent, dataclasses.replace(plan, growth=variant), out)
        else:
            where = {int(k) for k in plan.plan} if variant == "lora-plan" else None
            change = unfreeze_experts if variant == "finetune" else lambda m: add_delta(m, args.rank, where)
            acc, loss, n = in_memory(run_cfg, bundle, parent, out, change)
        print(f"| {variant} | {epochs} | {lr:g} | {acc:.1f} | {loss:.3f} | {n:,} |", flush=True)


if __name__ == "__main__":
    main()
