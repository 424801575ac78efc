"""The expansion stage as a program, for N processes: `torchrun` / the `deepspeed` launcher start it.

    torchrun --standalone --nproc_per_node 2 -m cmoe.stages.expand_main \\
        --config cmoe.yaml --bundle BUNDLE --probe probe.json --out OUT [--parent-state STATE]
    deepspeed --hostfile infra/deepspeed/hostfile --module cmoe.stages.expand_main --config ... (multi-node)
    python -m cmoe.stages.expand_main ...                      (one process: the same as in-process)

Every rank runs `run_expand` on the same arguments: the trainer splits each global batch over the
ranks (same weights as one process with the same global batch and seed), the ranks check they
hold identical trained tensors, and rank 0 alone writes OUT/state and OUT/expand.json (the
ExpandResult). Paths must be visible to every rank (OUT/checkpoints holds the resume checkpoints).
Rank 0 also appends its training curve to OUT/train_log.jsonl as it trains, one JSON line per
logged step, which the launching process follows (`read_steps`) to pass it on as it comes.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cmoe.env import apply_defaults
from cmoe.files import write_text_atomic

RESULT_FILE = "expand.json"  # the ExpandResult, written by rank 0 after the state
STEP_LOG = "train_log.jsonl"  # rank 0's training curve: {"step": N, "metrics": {...}} per line


def log_steps(path: Path) -> Callable[[int, dict], None]:
    """An `on_log` that appends each point of the curve to `path` (the trainer calls it on rank 0 only)."""

    def append(step: int, metrics: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    return append


def read_steps(path: Path, offset: int) -> tuple[list[tuple[int, dict]], int]:
    """The complete lines `log_steps` appended to `path` since byte `offset`, and the offset after them."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written is read next time
    points = [json.loads(line) for line in complete.splitlines()]
    return [(p["step"], p["metrics"]) for p in points], offset + len(complete)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the deepspeed launcher also passes --local_rank)."""
    ap = argparse.ArgumentParser(prog="python -m cmoe.stages.expand_main", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML config (default: $CMOE_CONFIG, else the embedded defaults)")
    ap.add_argument("--bundle", required=True,
                    help="task bundle: local folder or s3://bucket/prefix/, or the launcher's bundle.json")
    ap.add_argument("--eval-set", type=Path, help="eval_set.json: the task's kept evaluation set, recorded in the state")
    ap.add_argument("--out", required=True, type=Path, help="output folder (state/, checkpoints/, expand.json)")
    ap.add_argument("--parent-state", type=Path, help="CMoE state to build on (default: the upcycled base)")
    ap.add_argument("--probe", type=Path, help="probe.json of the PGKE stage (the expansion plan)")
    ap.add_argument("--variant", default="cmoe", choices=["cmoe", "single-router", "seq-ft"])
    ap.add_argument("--no-copy-base", action="store_true", help="reference the base by path instead of copying it")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the expansion on this rank; rank 0 writes the state and the result."""
    apply_defaults()
    args = parse_args(argv)
    if args.local_rank is not None:  # deepspeed launcher: --local_rank=N (torchrun sets the env itself)
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from cmoe.config import load_config
    from cmoe.data.evalsets import EvalSetRef
    from cmoe.data.validate import ValidatedBundle, open_bundle
    from cmoe.stages.distributed import on_rank0
    from cmoe.stages.expand import run_expand
    from cmoe.stages.probe import ProbeReport

    cfg = load_config(args.config)
    probe = ProbeReport(**json.loads(args.probe.read_text())) if args.probe else None
    eval_set = EvalSetRef.from_dict(json.loads(args.eval_set.read_text())) if args.eval_set else None
    if args.bundle.endswith(".json") and Path(args.bundle).is_file():  # validated by the launcher's caller
        bundle = ValidatedBundle.from_dict(json.loads(Path(args.bundle).read_text()))
    else:
        bundle = open_bundle(args.bundle, cache_dir=cfg.home / "cache")
    args.out.mkdir(parents=True, exist_ok=True)  # the step log is appended to before anything else is written
    result = run_expand(cfg, bundle, args.parent_state, probe, args.out, eval_set=eval_set,
                        copy_base=not args.no_copy_base, variant=args.variant,
                        on_log=log_steps(args.out / STEP_LOG))

    def write() -> Path:
        out = args.out / RESULT_FILE
        write_text_atomic(out, json.dumps(asdict(result), indent=2, default=str))
        return out

    on_rank0(write, default=args.out / RESULT_FILE)

    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()  # a clean exit on every rank (torchrun waits for all of them)


if __name__ == "__main__":
    main()
