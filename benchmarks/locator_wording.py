"""Task-locator accuracy on questions as asked vs re-worded, with and without text-token dropout.

    python -m benchmarks.locator_wording --state STATE --suite SUITE [--options 0:0,0.5:7]

STATE is a CMoE state that learned coin-mini's tasks (e.g. the last cmoe step of `cmoe bench`:
runs/bench/work/cmoe/05-locate-shape/expand/state) and SUITE the folder of its bundles. For each
option `text_dropout:augment_copies` the locator's VAEs are refitted on the training splits (the
product's `fit_locator`, nothing else changes), all options in one process, and scored on the test
splits: questions as the bundles ask them, and coin-mini's `unseen_questions`, wordings no bundle
uses. Routing only (no decoding): what it measures is which router a re-worded question gets.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

import torch

from cmoe.config import CmoeConfig
from cmoe.data.evalsets import eval_set_of
from cmoe.data.guard import training_scope
from cmoe.data.loading import load_split
from cmoe.data.synth import SUITES
from cmoe.data.validate import open_bundle
from cmoe.model.cmoe_layer import cmoe_info
from cmoe.model.inference import device_of
from cmoe.model.locator import TaskLocator, locator_features
from cmoe.stages.common import TaskData, encode_rows, open_lineage
from cmoe.stages.expand import fit_locator


def located_share(model: torch.nn.Module, processor, task: str, images: list, questions: list[str]) -> float:
    """Percent of (image, question) rows the model's locator sends to `task`."""
    encoded = [processor.encode(im, q) for im, q in zip(images, questions)]
    hits = 0
    for i in range(0, len(encoded), 64):
        b = processor.collate(encoded[i:i + 64], left_pad=True, device=device_of(model))
        pred = cmoe_info(model).locator.predict(locator_features(model, b["input_ids"], b["pixel_values"], b["attention_mask"]))
        hits += sum(name == task for name in pred.names)
    return 100 * hits / len(encoded)


def main() -> None:
    """Refit the locator per option, print one accuracy row per option."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--suite", type=Path, required=True)
    ap.add_argument("--options", default="0:0,0.3:7", help="comma-separated text_dropout:augment_copies")
    ap.add_argument("--seeds", default="0,1,2", help="fit seeds (VAE init, dropout draws): one fit per option and seed")
    args = ap.parse_args()

    cfg = CmoeConfig()
    model, processor = open_lineage(cfg, args.state)
    unseen = {t.name: t.unseen_questions for t in SUITES["coin-mini"]}
    tasks = cmoe_info(model).tasks
    cache = cfg.home / "cache"
    opened = [open_bundle(p, cache_dir=cache) for p in sorted(args.suite.iterdir()) if (p / "task.yaml").is_file()]
    bundles = {b.name: b for b in opened}
    train: dict[str, TaskData] = {}
    for t in tasks:
        # A measurement, not a lineage: it refits every task's VAE, so it reads each train split again
        # on purpose, in that bundle's own scope.
        with training_scope(bundles[t], {}):
            train[t] = encode_rows(bundles[t].spec, load_split(bundles[t], "train", cache_dir=cache), processor,
                                   with_answers=True)
    test: dict[str, TaskData] = {t: encode_rows(bundles[t].spec, eval_set_of(bundles[t], cache_dir=cache).rows,
                                                processor, with_answers=False) for t in tasks}

    print(f"re-worded: mean over seeds {args.seeds} [min-max]; per task: mean")
    print(f"{'dropout:copies':>15} | {'as asked':>8} | {'re-worded':>17} | " + " | ".join(f"{t:>12}" for t in tasks))
    for option in args.options.split(","):
        p, copies = option.split(":")
        cfg.locator.text_dropout, cfg.locator.augment_copies = float(p), int(copies)
        asked, reworded = [], []
        for seed in args.seeds.split(","):
            cfg.expand.seed = int(seed)  # fit_locator seeds the VAE and the dropout draws with it
            cmoe_info(model).locator = TaskLocator()
            for t in tasks:
                fit_locator(model, processor, train[t], cfg)
            asked.append(mean(located_share(model, processor, t, d.images, d.questions) for t, d in test.items()))
            reworded.append([located_share(model, processor, t, d.images,
                                           [unseen[t][i % len(unseen[t])] for i in range(len(d.images))])
                             for t, d in test.items()])
        totals = [mean(r) for r in reworded]  # equal-size test splits: the mean over tasks is the mean over rows
        per_task = [mean(col) for col in zip(*reworded)]
        print(f"{option:>15} | {mean(asked):8.1f} | {mean(totals):5.1f} [{min(totals):4.1f}-{max(totals):4.1f}] | "
              + " | ".join(f"{x:12.1f}" for x in per_task), flush=True)


if __name__ == "__main__":
    main()
