"""`cmoe base`: build the tiny default base, or inspect a local checkpoint of a supported family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cmoe.cli.common import ConfigOpt, console, fail, load

app = typer.Typer(no_args_is_help=True)


@app.command()
def build(
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <home>/base).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: base.seed of the config).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Pretrain the tiny vision-language base on the synthetic captions (cached per recipe)."""
    cfg = load(config)  # before the stages' imports: a bad config fails in a moment, not after torch loads
    from cmoe.stages.pretrain import build_base

    if seed is not None:
        cfg.base.seed = seed
    result = build_base(cfg.base, out or cfg.home / "base", cache_dir=cfg.home / "cache", moe=cfg.moe)
    if result.phases_s:
        console.print("time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.phases_s.items()))
    h = result.heldout
    console.print(f"base {'reused' if result.reused else 'built'} at [bold]{result.path}[/] "
                  f"({result.params_total:,} params, weights sha256 {result.weights_sha256[:16]}…, {result.wall_s:.0f} s)")
    console.print(f"held-out captions ({h['n']}): attribute recall {h['attribute_recall']:.1f} % "
                  f"(chance {h['chance_attribute_recall']:.1f} %), exact caption {h['caption_exact']:.1f} % "
                  f"(chance {h['chance_caption_exact']:.1f} %)")
    final = result.moe_stage or {"styleshift": result.styleshift}  # what the tasks build on
    if result.moe_stage:
        m = result.moe_stage
        console.print(f"MoE stage: experts' mean pairwise output similarity {m['mean_pairwise_similarity']:.3f} "
                      f"(1 = copies); after it attribute recall {m['heldout']['attribute_recall']:.1f} %")
    s = final["styleshift"]
    console.print(f"style-shifted suite ({s['n']}): base {s['base_acc']:.1f} % vs text-only prior {s['prior_acc']:.1f} % "
                  f"(margin {s['margin']:+.1f})")


_INFO_PATH = "A local checkpoint folder: LLaVA, LLaVA-NeXT / OneVision, Qwen2-VL / 2.5-VL or Idefics3 / SmolVLM."


@app.command()
def info(path: Annotated[Path, typer.Argument(help=_INFO_PATH)]) -> None:
    """Print the family, backbone types, parameter counts and layers of a base checkpoint."""
    from cmoe.model.base import BaseModelError, describe, load_base

    try:
        model, _ = load_base(path)
    except BaseModelError as err:
        raise fail(err) from None
    d = describe(model)
    table = Table(title=str(path), show_header=False)
    for k, v in d.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    console.print(table)
