"""Train a tiny deterministic MLP with cmoe's trainer under torchrun (test helper); the tests import
its model, data and spec to run the same training in their own process.

--stop-at N raises from on_log at step N, leaving the checkpoints behind like a killed run would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cmoe.stages.trainer import GlobalBatch, TrainSpec, train


class Stopped(RuntimeError):
    """Raised to simulate a run that dies right after a checkpoint."""


def build(seed: int) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """An MLP with a frozen first layer and a synthetic classification set, both a function of `seed`."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model[0].requires_grad_(False)
    x = torch.randn(96, 8, generator=gen)
    y = (x[:, :3].argmax(dim=1) + (x[:, 3] > 1).long()) % 3
    return model, list(zip(x, y))


def collate(items: list) -> dict:
    """Stack (x, y) pairs into a batch dict."""
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}


def loss_fn(engine: torch.nn.Module, batch: dict, glob: GlobalBatch) -> torch.Tensor:
    """Cross-entropy of the MLP's logits: this micro-batch's share of the global-batch mean."""
    return glob.share(torch.nn.functional.cross_entropy(engine(batch["x"]), batch["y"]), len(batch["y"]))


def train_spec(seed: int = 0, config: str | None = None, checkpoint_dir: Path | None = None,
               steps: int = 20, batch_size: int = 16, checkpoint_every: int = 5) -> TrainSpec:
    """The script's run: the same spec whichever process trains it (a resume checks the fingerprint)."""
    return TrainSpec(steps=steps, batch_size=batch_size, seed=seed, deepspeed_config=config,
                     checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, log_every=1, desc="ddp-test")


def main() -> None:
    """Parse arguments and train; --stop-at ends the run the way a crash would."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=None)
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    args = ap.parse_args()

    def on_log(step: int, metrics: dict) -> None:
        if step == args.stop_at:
            raise Stopped(f"stopped at step {step}")

    torch.manual_seed(args.seed)
    model, data = build(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    spec = train_spec(args.seed, args.config, args.checkpoint_dir, args.steps, args.batch_size, args.checkpoint_every)
    train(model, params, data, collate, loss_fn, spec, on_log=on_log)


if __name__ == "__main__":
    main()
