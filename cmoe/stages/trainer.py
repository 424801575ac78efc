"""The one DeepSpeed trainer behind every training in cmoe (probe, expansion, locator, baselines).

Same entry point in-process (world size 1, CPU or one GPU) and under `torchrun` / the `deepspeed`
launcher (N processes; scripts started by the latter must accept `--local_rank`). A global batch
is split over ranks and gradient-accumulation micro-steps; `loss_fn` gets a `GlobalBatch` and
returns its micro-batch's *share* of the global-batch loss (shares add up to the loss one forward
over the whole global batch computes). The trainer undoes DeepSpeed's averaging over ranks and
micro-steps, so with the same seed and global batch N processes give the weights of 1 process
for any loss written that way: a token-mean LM loss (`GlobalBatch.label_tokens`, the HF
`num_items_in_batch` convention) as much as a per-example mean. `on_log` and the progress bar
run on rank 0 only.

Resume checkpoints are DeepSpeed's own, i.e. torch pickles: they live in `spec.checkpoint_dir`
(visible to every rank) only to resume this run, are deleted when it finishes, and must never be
published or loaded from anywhere else (the durable state is the caller's safetensors). Since
loading one unpickles it, rank 0 records the sha256 of every file of each checkpoint it wrote in
`HASHES` (written atomically after the checkpoint), and a resume hands DeepSpeed only a checkpoint
whose files are exactly the recorded ones: a changed, added or missing file is refused before
anything is loaded. A checkpoint cut short before its hashes were recorded is never loaded: the
run resumes from the newest recorded one (or starts fresh).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.torch_autocast import autocast_if_enabled
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from cmoe.files import file_sha256, write_text_atomic
from cmoe.net import free_port

CONFIG_DIR = Path(__file__).resolve().parents[2] / "infra" / "deepspeed"
_STEP_TAG = re.compile(r"^step(\d+)(_universal)?$")
_KEEP_CHECKPOINTS = 2
IGNORE_INDEX = -100  # label value losses skip (Hugging Face's convention)
HASHES = "sha256.json"  # {tag: {file relative to the tag's folder: sha256}} of the checkpoints written
# Files written next to the step folders (DeepSpeed's markers and conversion scripts, the hashes).
_DEEPSPEED_EXTRAS = ("latest", "latest_universal", "zero_to_fp32.py", "zero_to_torch.py", HASHES)


class CheckpointError(ValueError):
    """A resume checkpoint that must not be loaded (unpickled): the message names the file and why."""


@dataclass
class TrainSpec:
    """What to train for and how; the DeepSpeed JSON holds only ZeRO stage, precision and the rest."""

    epochs: int | None = None  # exactly one of epochs / steps
    steps: int | None = None
    batch_size: int = 32  # GLOBAL batch (= micro × world × grad-accum)
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # linear warm-up then cosine decay to 0 (CoIN's schedule)
    grad_clip: float = 1.0  # 0 = no clipping
    seed: int = 0
    # A path, or a name in infra/deepspeed/ ("zero2_cpu.json", "zero2" = CPU or GPU variant by device);
    # None = zero0 for this device (CPU fp32, or GPU bf16 when a GPU is present).
    deepspeed_config: str | Path | None = None
    checkpoint_dir: Path | None = None  # resume checkpoints (DeepSpeed's own, pickled → local and transient only)
    checkpoint_every: int = 50
    desc: str = "train"  # progress-bar label
    log_every: int = 10


@dataclass(frozen=True)
class GlobalBatch:
    """The global batch (one optimizer step) a micro-batch is part of: what a loss needs for its share.

    The step is every rank's `micro_steps` micro-batches. Sum-type losses divide by the
    global count (`samples` or `label_tokens`) instead of their micro-batch's; statistics that are
    not sums over examples (e.g. MoE load balancing) are summed over ranks with `reduce_sum`.
    """

    samples: int  # examples in the global batch (= TrainSpec.batch_size)
    label_tokens: int  # supervised tokens (labels != -100) in the global batch; 0 when batches carry no labels
    micro_steps: int  # gradient-accumulation micro-batches per rank and step
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over the ranks' current micro-batches

    def share(self, mean_loss: torch.Tensor, n: int) -> torch.Tensor:
        """The share of a loss that is a mean over this micro-batch's `n` examples."""
        return mean_loss * (n / self.samples)


@dataclass
class TrainResult:
    """Summary of one `train` call; JSON-serialisable with `dataclasses.asdict`."""

    steps: int  # optimizer steps of the whole run (resumed ones included)
    samples: int  # steps × global batch
    final_loss: float  # global-batch loss of the last step
    mean_loss_last_10pct: float
    wall_s: float  # this call, engine set-up included
    samples_per_s: float  # samples trained by this call / its training-loop time
    resumed_from_step: int | None
    world_size: int
    device: str


def train(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    dataset: Sequence,
    collate: Callable[[list], dict],
    loss_fn: Callable[[torch.nn.Module, dict, GlobalBatch], torch.Tensor],
    spec: TrainSpec,
    on_log: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train exactly `params` of `model` with DeepSpeed; resumes if `spec.checkpoint_dir` holds a checkpoint."""
    t_call = time.perf_counter()
    _check_inputs(model, params, dataset, spec)
    device_type = get_accelerator().device_name()  # "cuda" when a GPU is visible, else "cpu"
    _init_distributed(device_type)
    rank, world = dist.get_rank(), dist.get_world_size()

    config = _load_config(spec.deepspeed_config, device_type)
    accum = int(config.get("gradient_accumulation_steps", 1))
    if spec.batch_size % (world * accum):
        raise ValueError(
            f"batch_size {spec.batch_size} is not divisible by world size {world}"
            f" × gradient_accumulation_steps {accum}"
        )
    micro = spec.batch_size // (world * accum)
    # Only full global batches: the batch (and so the update) is then identical for any world size.
    steps_per_epoch = len(dataset) // spec.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"dataset has {len(dataset)} items, fewer than one global batch of {spec.batch_size}")
    total = total_steps(spec, len(dataset))
    warmup = math.ceil(spec.warmup_ratio * total)
    config.update(
        train_batch_size=spec.batch_size,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        gradient_clipping=spec.grad_clip,
        # torch_adam: DeepSpeed's FusedAdam would JIT-compile a CUDA kernel; torch's AdamW runs everywhere.
        optimizer={"type": "AdamW", "params": {"lr": spec.lr, "weight_decay": spec.weight_decay, "torch_adam": True}},
    )
    config.pop("scheduler", None)  # the schedule is ours (below), identical on every device

    ckpt_dir = Path(spec.checkpoint_dir) if spec.checkpoint_dir is not None else None
    resume_tag = _resume_tag(ckpt_dir, config, world, rank)

    torch.manual_seed(spec.seed)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, partial(_lr_factor, warmup=warmup, total=total)),
    )
    # A resume is only valid for the very same run: same data order, schedule and trainable tensors.
    fingerprint = {
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "total_steps": total,
        "dataset_len": len(dataset),
        "zero_stage": config.get("zero_optimization", {}).get("stage", 0),
        "params": sorted(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters() if p.requires_grad),
    }
    bar = None
    try:
        start, losses = 0, []
        if resume_tag is not None:
            # Frozen tensors were left out of the checkpoint, hence non-strict.
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=resume_tag, load_module_strict=False)
            if path is None:
                raise RuntimeError(f"could not load checkpoint {ckpt_dir / resume_tag}")
            if client.get("fingerprint") != fingerprint:
                raise ValueError(f"{ckpt_dir} holds a checkpoint of a different run; delete it or use another dir")
            start, losses = client["step"], list(client["losses"])
        resumed_from = start if start else None

        engine.train()
        bar = tqdm(total=total, initial=start, desc=spec.desc, disable=rank != 0, dynamic_ncols=True)
        t_loop = time.perf_counter()
        order = None
        for step in range(start, total):
            epoch, pos = divmod(step, steps_per_epoch)
            if order is None or pos == 0:
                order = _epoch_order(len(dataset), spec.seed, epoch)
            # Rank r takes every world-th item of the global batch; the union over ranks is the global batch.
            mine = order[pos * spec.batch_size : (pos + 1) * spec.batch_size][rank::world].tolist()
            # RNG (e.g. dropout) as a function of (seed, step): a resumed run draws what an uninterrupted one would.
            torch.manual_seed(spec.seed * 1_000_003 + step)
            lr = engine.get_lr()[0]  # this step's rate (after the step the scheduler already points at the next)
            batches = [_to_device(collate([dataset[i] for i in mine[j * micro : (j + 1) * micro]]), engine.device)
                       for j in range(accum)]
            glob = GlobalBatch(samples=spec.batch_size, label_tokens=_global_label_tokens(batches, engine.device),
                               micro_steps=accum, reduce_sum=_reduce_sum)
            loss_sum = torch.zeros((), device=engine.device)
            for batch in batches:
                # bf16 autocast (GPU configs) also covers loss_fn code that calls engine.module directly.
                with autocast_if_enabled(engine):
                    share = loss_fn(engine, batch, glob)
                # DeepSpeed averages gradients over ranks; × world (and no ÷ micro-steps) makes the
                # update the gradient of the sum of shares, i.e. of the global-batch loss.
                engine.backward(share * world, scale_wrt_gas=False)
                engine.step()  # steps the optimizer + schedule only at the accumulation boundary
                loss_sum += share.detach().float()
            # Report the global batch's loss: the same number on every rank and for any world size.
            dist.all_reduce(loss_sum)
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{spec.desc}: loss is {loss_value} at step {step + 1}")
            losses.append(loss_value)
            done = step + 1
            samples_per_s = (done - start) * spec.batch_size / (time.perf_counter() - t_loop)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_per_s=f"{samples_per_s:.1f}", refresh=False)

            # Checkpoint before logging so that a run stopped from on_log can resume from this step.
            if ckpt_dir is not None and done % spec.checkpoint_every == 0 and done < total:
                client = {"step": done, "epoch": done // steps_per_epoch, "losses": losses, "fingerprint": fingerprint}
                engine.save_checkpoint(
                    str(ckpt_dir), tag=f"step{done}", client_state=client, exclude_frozen_parameters=True
                )  # returns once every rank has written its files
                if rank == 0:
                    _prune_checkpoints(ckpt_dir, keep=_KEEP_CHECKPOINTS)
                    _record_hashes(ckpt_dir, f"step{done}")
            if on_log is not None and rank == 0 and (done % spec.log_every == 0 or done == total):
                on_log(done, {"loss": loss_value, "lr": lr, "samples_per_s": samples_per_s})
        loop_s = time.perf_counter() - t_loop

        if ckpt_dir is not None:
            dist.barrier()  # every rank is past its last read of the checkpoint
            if rank == 0:
                _prune_checkpoints(ckpt_dir, keep=0)
    finally:
        if bar is not None:
            bar.close()
        _release(engine)

    tail = losses[-max(1, math.ceil(0.1 * len(losses))) :]
    return TrainResult(
        steps=total,
        samples=total * spec.batch_size,
        final_loss=losses[-1],
        mean_loss_last_10pct=sum(tail) / len(tail),
        wall_s=time.perf_counter() - t_call,
        samples_per_s=(total - start) * spec.batch_size / loop_s if loop_s > 0 else 0.0,
        resumed_from_step=resumed_from,
        world_size=world,
        device=str(engine.device),
    )


def total_steps(spec: TrainSpec, items: int) -> int:
    """Optimizer steps `train` takes on `items` examples: `spec.steps`, or epochs of full global batches."""
    return spec.steps if spec.steps is not None else spec.epochs * (items // spec.batch_size)


def resolve_config(name: str | Path | None, device_type: str) -> Path:
    """Path of a DeepSpeed JSON: an existing path, a file name in infra/deepspeed/, or "zeroN" for this device."""
    suffix = "cpu" if device_type == "cpu" else "gpu_bf16"
    if name is None:
        name = "zero0"
    candidates = [Path(name), CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.json", CONFIG_DIR / f"{name}_{suffix}.json"]
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.json")))
    raise FileNotFoundError(f"unknown deepspeed_config {str(name)!r}: not a file, nor one of {CONFIG_DIR}: {known}")


def _resume_tag(ckpt_dir: Path | None, config: dict[str, Any], world: int, rank: int) -> str | None:
    """Tag of the verified checkpoint to resume from (None: start fresh); converts it if the world size changed."""
    if ckpt_dir is None or not (ckpt_dir / "latest").is_file():
        return None
    tag = _recorded_tag(ckpt_dir)
    if tag is None:
        return None
    saved_world = len(list((ckpt_dir / tag).glob("zero_pp_rank_*_optim_states.pt")))  # 0 under ZeRO-0
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if (saved_world > 0) != (stage > 0):
        raise ValueError(f"{ckpt_dir / tag} was written with another ZeRO stage than {stage}; delete it or switch back")
    if saved_world in (0, world):
        return tag
    # ZeRO-1/2 optimizer state is partitioned by world size; DeepSpeed reloads it on another world
    # size only from a "universal" checkpoint, which its own converter writes.
    universal = f"{tag}_universal"
    if rank == 0 and universal not in _read_hashes(ckpt_dir):  # converted here, from the verified tag
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        shutil.rmtree(ckpt_dir / universal, ignore_errors=True)  # a folder this run did not record is not used
        to_universal(argparse.Namespace(
            input_folder=str(ckpt_dir / tag), output_folder=str(ckpt_dir / universal), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        ))
        _record_hashes(ckpt_dir, universal)
    dist.barrier()
    _verify_checkpoint(ckpt_dir, universal)
    config["checkpoint"] = {"load_universal": True}
    return universal


def _recorded_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names once its files are checked against `HASHES`; the newest recorded tag
    when `latest` names a newer checkpoint cut short before its hashes were recorded (None: none).

    CheckpointError for a `latest` that is not a step tag or names an older, unrecorded one, and for
    a checkpoint whose files differ from the recorded ones: nothing is loaded from it.
    """
    latest = (ckpt_dir / "latest").read_text().strip()
    m = _STEP_TAG.match(latest)
    if m is None or m[2]:
        raise CheckpointError(f"{ckpt_dir / 'latest'}: names {latest[:80]!r}, not a step checkpoint of this trainer; "
                              f"delete {ckpt_dir} to start fresh")
    recorded = sorted((int(r[1]), tag) for tag in _read_hashes(ckpt_dir)
                      if (r := _STEP_TAG.match(tag)) and not r[2])
    if latest not in {tag for _, tag in recorded}:
        if recorded and recorded[-1][0] > int(m[1]):
            raise CheckpointError(f"{ckpt_dir / 'latest'}: names {latest}, older than the recorded "
                                  f"{recorded[-1][1]}; delete {ckpt_dir} to start fresh")
        # A crash between DeepSpeed writing the checkpoint and its hashes being recorded.
        latest = recorded[-1][1] if recorded else None
    if latest is not None:
        _verify_checkpoint(ckpt_dir, latest)
    return latest


def _read_hashes(ckpt_dir: Path) -> dict[str, dict[str, str]]:
    """{tag: {relative file: sha256}} of the recorded checkpoints; {} before the first one."""
    file = ckpt_dir / HASHES
    if not file.is_file():
        return {}
    try:
        hashes = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); delete {ckpt_dir} to start fresh") from None
    if not isinstance(hashes, dict) or not all(isinstance(v, dict) for v in hashes.values()):
        raise CheckpointError(f"{file}: not a {{tag: {{file: sha256}}}} record; delete {ckpt_dir} to start fresh")
    return hashes


def _record_hashes(ckpt_dir: Path, tag: str) -> None:
    """Add `tag`'s files to `HASHES` (and drop the tags pruned since); rank 0, once the checkpoint is written."""
    kept = {t: h for t, h in _read_hashes(ckpt_dir).items() if (ckpt_dir / t).is_dir()}
    kept[tag] = _folder_hashes(ckpt_dir / tag)
    write_text_atomic(ckpt_dir / HASHES, json.dumps(kept, indent=1, sort_keys=True))


def _verify_checkpoint(ckpt_dir: Path, tag: str) -> None:
    """CheckpointError unless `tag`'s folder holds exactly the files recorded for it, byte for byte."""
    expected = _read_hashes(ckpt_dir).get(tag)
    folder = ckpt_dir / tag
    if expected is None or not folder.is_dir():
        raise CheckpointError(f"{folder}: no recorded checkpoint of this run; delete {ckpt_dir} to start fresh")
    found = _folder_hashes(folder)
    for name in sorted(expected.keys() | found.keys()):
        if found.get(name) != expected.get(name):
            what = ("missing" if name not in found else "not written by this run" if name not in expected
                    else f"sha256 {found[name][:16]}… differs from the recorded {expected[name][:16]}…")
            raise CheckpointError(f"{folder / name}: {what}; refusing to load (unpickle) this checkpoint. "
                                  f"Delete {ckpt_dir} to start fresh")


def _folder_hashes(folder: Path) -> dict[str, str]:
    """{file relative to `folder`: sha256} of every file below it."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():  # a link counts as the file DeepSpeed would open through it
            hashes[str(path.relative_to(folder))] = file_sha256(path)
    return hashes


def _load_config(name: str | Path | None, device_type: str) -> dict[str, Any]:
    """The JSON as a dict, minus our comment keys (DeepSpeed ignores unknown top-level keys, but keep it clean)."""
    config = json.loads(resolve_config(name, device_type).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _check_inputs(model: torch.nn.Module, params: list[torch.nn.Parameter], dataset: Sequence, spec: TrainSpec) -> None:
    """Fail before any DeepSpeed set-up on inputs that cannot train."""
    if (spec.epochs is None) == (spec.steps is None):
        raise ValueError("TrainSpec needs exactly one of epochs / steps")
    if (spec.epochs if spec.epochs is not None else spec.steps) <= 0:
        raise ValueError("TrainSpec epochs / steps must be positive")
    if spec.batch_size <= 0 or spec.checkpoint_every <= 0 or spec.log_every <= 0:
        raise ValueError("TrainSpec batch_size, checkpoint_every and log_every must be positive")
    if len(dataset) == 0:
        raise ValueError(f"{spec.desc}: the dataset is empty")
    if not params:
        raise ValueError(f"{spec.desc}: no trainable parameters were given")
    # `params` must be exactly the model's requires_grad tensors: anything else would either be
    # silently left untrained or collect gradients while it should stay bit-identical.
    given = {id(p) for p in params}
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    if len(given) != len(params):
        raise ValueError("params lists a tensor twice")
    if given - trainable.keys():
        raise ValueError("params holds tensors that are not requires_grad parameters of the model")
    if extra := [n for i, n in trainable.items() if i not in given]:
        raise ValueError(f"model parameters with requires_grad=True missing from params: {extra[:5]}")


def torch_extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops are cached: one folder per Python environment, because an op
    built against one venv's headers is rebuilt (~50 s) by the next venv that loads it."""
    env = hashlib.sha256(f"{sys.prefix}|{torch.__version__}|{deepspeed.__version__}".encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "cmoe" / "torch_extensions" / env


def build_cpu_comm_op() -> None:
    """Build DeepSpeed's CPU shared-memory comm op into the cache now (`make setup` calls it), so the
    first engine of a run loads it instead of compiling it; on an accelerator without it, nothing."""
    from deepspeed.ops import __compatible_ops__

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and __compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)


def _init_distributed(device_type: str) -> None:
    """Join the process group once per process; alone, become rank 0 of 1 (else DeepSpeed tries mpi4py)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    # DeepSpeed's CPU accelerator defaults to oneCCL, which is not installed; gloo is.
    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else None)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _global_label_tokens(batches: list[dict], device: torch.device) -> int:
    """Supervised tokens of the global batch: this rank's micro-batches, summed over ranks (HF's count)."""
    mine = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches if "labels" in b)
    return int(_reduce_sum(torch.tensor(mine, device=device)).item())


def _reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (a new tensor; `t` itself is left alone). Every rank must call it."""
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """CoIN's schedule: linear warm-up to 1, then cosine to 0 at `total`; never 0 on a step that is taken."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Item order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (keep=0: all of them, the `latest` marker too)."""
    if not ckpt_dir.is_dir():  # a run shorter than one checkpoint interval never wrote one
        return
    tags = sorted((int(m[1]), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _STEP_TAG.match(p.name)))
    for _, path in tags[: len(tags) - keep]:
        shutil.rmtree(path)
    if keep == 0:
        for name in _DEEPSPEED_EXTRAS:
            (ckpt_dir / name).unlink(missing_ok=True)
        if not any(ckpt_dir.iterdir()):
            ckpt_dir.rmdir()


def _release(engine: deepspeed.DeepSpeedEngine) -> None:
    """Detach the engine from the model so the next `train` call can build a fresh one on it."""
    engine.destroy()  # removes ZeRO's gradient hooks
    # destroy() leaves the engine's forward hooks on the module; they would keep this engine (and its
    # optimizer state) alive and run its bookkeeping on every later forward.
    for hook in (engine.module_forward_pre_hook, engine.module_forward_post_hook):
        if hook is not None:
            hook.remove()
