"""Where and how models run: device choice and mixed precision (decoding, training and extraction use them)."""

from contextlib import AbstractContextManager, nullcontext

import torch

from data.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None = None) -> torch.device:
    """`cuda` when there is a GPU and no device is named; a named CUDA device must exist."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):  # torch's message lists every device type it knows
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
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
