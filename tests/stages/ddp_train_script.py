"""Train a tiny deterministic MLP with cmoe's trainer; run alone or under torchrun / deepspeed (test helper).

Writes the trainable tensors (rank 0) to --out as safetensors and the TrainResult to --out + ".json".
--stop-at N raises from on_log at step N, leaving the checkpoints behind like a killed run would.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def main() -> None:
    """Parse arguments, train, write the trainable weights and the result."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
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
    spec = TrainSpec(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, deepspeed_config=args.config,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, log_every=1, desc="ddp-test",
    )
    result = train(model, params, data, collate, loss_fn, spec, on_log=on_log)
    if torch.distributed.get_rank() == 0:
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}, args.out)
        Path(f"{args.out}.json").write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
