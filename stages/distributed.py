"""torchrun's process group: this process's rank, joining the group and leaving it."""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from data.errors import InputError
from models.device import resolve_device

TIMEOUT_ENV = "CLIPCAP_PG_TIMEOUT_S"  # seconds a collective may wait (torch's default when unset: 10 min on NCCL)
# How long the other ranks wait while the main process alone works (validation captions scored by
# Java): far longer than a collective should wait, so it has a group of its own.
MAIN_WORK_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str | None = None) -> tuple[DistributedContext, torch.device]:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext(), resolve_device(device_name)
    context = DistributedContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, allow_mps=False)  # auto: CUDA, else CPU (gloo)
    if device.type == "cuda":  # whichever GPU was named or chosen, each rank takes its local one
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=process_group_timeout())
    return context, device


def process_group_timeout() -> timedelta | None:
    """$CLIPCAP_PG_TIMEOUT_S as a timeout, else None (torch's default)."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise InputError(f"{TIMEOUT_ENV}={value}: must be a positive number of seconds")
    return timedelta(seconds=seconds)


def main_work_group(context: DistributedContext) -> dist.ProcessGroup | None:
    """A gloo group with a long timeout, for waiting on the main process (all ranks must create it)."""
    return dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT) if context.enabled else None


def wait_for_main(group: dist.ProcessGroup | None) -> None:
    """Every rank waits here until the main process has finished its work alone (see main_work_group)."""
    if group is not None:
        dist.barrier(group=group)


def gather_counts(count: int, context: DistributedContext, device: torch.device) -> list[int]:
    """Every rank's `count`, in rank order (a collective: all ranks must call it)."""
    if not context.enabled:
        return [count]
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(context.world_size)]
    dist.all_gather(counts, torch.tensor([count], device=device))  # NCCL gathers tensors on the rank's device
    return [int(value) for value in counts]


def gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Every rank's picklable `value`, in rank order (a collective: all ranks must call it)."""
    if not context.enabled:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def close_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
