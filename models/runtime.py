"""Where and how models run: device choice, mixed precision, and torchrun's process group."""

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None = None) -> torch.device:
    """`cuda` when there is a GPU and no device is named; a named CUDA device must exist."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    return device


def resolve_precision(name: str | None, device: torch.device) -> str:
    """`bf16` on CUDA and `fp32` on CPU unless named; half precision is for CUDA only."""
    if name is None or name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise InputError(f"--precision {name}: choose from {', '.join(PRECISIONS)}")
    if name != "fp32" and device.type != "cuda":
        raise InputError(f"--precision {name} needs a CUDA device; on {device.type} use fp32")
    return name


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16 on CUDA; nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


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
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return context, device


def close_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
