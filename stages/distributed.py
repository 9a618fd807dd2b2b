"""torchrun's process group: this process's rank, joining the group and leaving it, and --fsdp's sharding
of the model (FSDP2) with the whole state dicts that checkpoints hold."""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from data.errors import InputError
from models.device import resolve_device

TIMEOUT_ENV = "CLIPCAP_PG_TIMEOUT_S"  # seconds a collective may wait (torch's default when unset: 10 min on NCCL)
# How long the other ranks wait while the main process alone works (validation captions scored by
# Java): far longer than a collective should wait, so it has a group of its own.
MAIN_WORK_TIMEOUT = timedelta(hours=6)
# A sharded model's state gathered whole, on rank 0's CPU only (the others get empty dicts): what is saved.
GATHERED_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
# A whole state that every rank holds (each read the checkpoint), each rank keeping its shard of it.
WHOLE_ON_EVERY_RANK = StateDictOptions(full_state_dict=True)


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


def shard_model(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """FSDP2: each block's parameters sharded over the ranks (gathered for its forward and backward only), then
    the rest (embeddings, head, mapper: the root's); the shards move to `device`. Tied weights stay tied."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict on rank 0's CPU, empty elsewhere (a collective: all ranks call it)."""
    return get_model_state_dict(model, options=GATHERED_ON_MAIN)


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state, keyed by parameter name, on rank 0's CPU (a collective, as above)."""
    return get_optimizer_state_dict(model, optimizer, options=GATHERED_ON_MAIN)


def load_sharded_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put back a gathered optimizer state (every rank holds it whole), each rank taking its shard."""
    set_optimizer_state_dict(model, optimizer, state, options=WHOLE_ON_EVERY_RANK)
