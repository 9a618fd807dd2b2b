"""Where and how models run: device choice and mixed precision (decoding, training and extraction use them)."""

from contextlib import AbstractContextManager, nullcontext

import torch

from data.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The --device and --precision help of every script that takes them.
DEVICE_HELP = "auto (CUDA, else Apple MPS, else CPU; under torchrun the rank's CUDA GPU), cpu, cuda, cuda:N or mps"
PRECISION_HELP = (
    "autocast precision; auto: bf16 where the device has it (CUDA compute capability 8+, MPS on macOS 14+), "
    "else fp16 on CUDA and fp32 on MPS and CPU"
)


def resolve_device(name: str | None = None, *, allow_mps: bool = True) -> torch.device:
    """`auto` (or None): CUDA, else MPS (when allowed), else CPU; a named accelerator must exist."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if allow_mps and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):  # torch's message lists every device type it knows
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not allow_mps:
        raise InputError(f"--device {name}: DistributedDataParallel has no MPS backend; use cuda or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: no Apple MPS device is available here (use --device cpu)")
    return device


def supports_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: CUDA of compute capability 8.0 or newer (or ROCm), or an
    MPS device on which torch makes bf16 tensors (macOS 14 or newer)."""
    if device.type == "cuda":
        # Older GPUs only emulate bf16 (slowly), which torch.cuda.is_bf16_supported() counts as support.
        return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "mps":
        try:  # torch has no query for it: older macOS refuses the tensor
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False
        return True
    return False


def resolve_precision(name: str | None, device: torch.device) -> str:
    """`auto` (or None): bf16 where the device supports it, else fp16 on CUDA, fp32 on MPS and CPU.
    A named half precision needs CUDA or MPS, and bf16 on MPS needs its support."""
    if name is None or name == "auto":
        if supports_bf16(device):
            return "bf16"
        # fp16 trains under the GradScaler on CUDA; fp16 training on MPS is left to an explicit choice.
        return "fp16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise InputError(f"--precision {name}: choose from {', '.join(PRECISIONS)}")
    if name != "fp32" and device.type not in ("cuda", "mps"):
        raise InputError(f"--precision {name} needs a CUDA or MPS device; on {device.type} use fp32")
    if name == "bf16" and device.type == "mps" and not supports_bf16(device):
        raise InputError("--precision bf16: this MPS device has no bf16 (it needs macOS 14); use fp16 or fp32")
    return name


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16 on CUDA or MPS; nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
