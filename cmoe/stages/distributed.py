"""What a stage needs to run as N processes (torchrun / the deepspeed launcher) and stay correct.

Every rank of a data-parallel run computes the same weights; only rank 0 may write the durable
state, and the others must not return before it is written. Outside a process group (the usual
in-process run) every helper is a no-op: rank 0 of 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the raw bytes (dtype, shape and values) of `tensors`, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_ranks_agree(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Fail on every rank unless all ranks hold bit-identical `tensors` (nothing to do in one process)."""
    _, world = rank_and_world()
    if world == 1:
        return
    mine = digest(tensors)
    found: list[str | None] = [None] * world
    tdist.all_gather_object(found, mine)
    if len(set(found)) != 1:
        raise RuntimeError(f"{what}: the {world} ranks trained different weights (sha256 by rank: "
                           + ", ".join(f"{r}: {d[:12]}" for r, d in enumerate(found)) + ")")


def on_rank0(write: Callable[[], T], default: T) -> T:
    """Run `write()` on rank 0 only; the other ranks wait for it and return `default`.

    An exception on rank 0 is raised on every rank (nobody waits forever for a file never written).
    """
    rank, world = rank_and_world()
    if world == 1:
        return write()
    result, error = default, None
    if rank == 0:
        try:
            result = write()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = err
    status = [f"{type(error).__name__}: {error}" if error is not None else None]
    tdist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"rank 0 failed to write: {status[0]}")
    return result
