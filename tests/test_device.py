"""--device auto and --precision auto: CUDA, then MPS, then CPU; bf16 only where the device has it; under
torchrun auto stays the rank's CUDA GPU (or the CPU), never MPS. Accelerators are faked by monkeypatching."""

import pytest
import torch

import train
from data.errors import InputError
from models import device as device_module
from models.device import resolve_device, resolve_precision, supports_bf16
from stages import distributed


@pytest.fixture
def machine(monkeypatch):
    """Set which accelerators this fake machine has: machine(cuda=..., mps=..., capability=..., mps_bf16=...)."""

    def configure(cuda: bool = False, mps: bool = False, capability: tuple = (8, 0), mps_bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        real_ones = torch.ones

        def ones(*size, dtype=None, device=None, **kwargs):
            # The MPS probe of supports_bf16; older macOS answers with a TypeError.
            if device is not None and torch.device(device).type == "mps":
                if dtype == torch.bfloat16 and not mps_bf16:
                    raise TypeError("MPS BFloat16 is only supported on MacOS 14 or newer")
                return real_ones(*size, dtype=dtype, **kwargs)
            return real_ones(*size, dtype=dtype, device=device, **kwargs)

        monkeypatch.setattr(device_module.torch, "ones", ones)

    return configure


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_picks_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("auto", allow_mps=False).type == ("cuda" if cuda else "cpu")


def test_auto_is_every_scripts_default():
    import evaluate
    import parse_coco_clip
    import predict
    import train_clip

    assert train.parse_args(["--data", "x"]).device == "auto"
    assert train_clip.parse_args(["--captions_file", "x", "--images_dir", "y", "--out_dir", "z"]).device == "auto"
    assert predict.parse_args(["image.jpg", "--checkpoint", "x"]).device == "auto"
    assert evaluate.parse_args(["--predictions", "x", "--references", "y"]).device == "auto"
    assert parse_coco_clip.parse_args([]).device == "auto"


@pytest.mark.parametrize(
    ("name", "cuda", "mps", "message"),
    [
        ("mps", False, False, "--device mps: no Apple MPS device is available here"),
        ("cuda", False, True, "--device cuda: no CUDA GPU is available here"),
        ("tpu", True, True, "--device tpu: unknown device; use auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_a_named_device_must_exist(machine, name, cuda, mps, message):
    machine(cuda=cuda, mps=mps)
    with pytest.raises(InputError, match=message):
        resolve_device(name)


@pytest.mark.parametrize(
    ("device", "capability", "mps_bf16", "expected"),
    [
        ("cuda", (9, 0), True, "bf16"),  # Hopper
        ("cuda", (8, 0), True, "bf16"),  # Ampere: native bf16
        ("cuda", (7, 5), True, "fp16"),  # Turing: bf16 only emulated
        ("mps", (8, 0), True, "bf16"),  # macOS 14 or newer
        ("mps", (8, 0), False, "fp32"),
        ("cpu", (8, 0), True, "fp32"),
    ],
)
def test_auto_precision_uses_bf16_only_where_the_device_has_it(machine, device, capability, mps_bf16, expected):
    machine(cuda=True, mps=True, capability=capability, mps_bf16=mps_bf16)
    assert resolve_precision("auto", torch.device(device)) == expected
    assert resolve_precision(None, torch.device(device)) == expected


def test_named_precisions_are_checked_against_the_device(machine):
    machine(cuda=True, mps=True, mps_bf16=False)
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("mps")) == "fp16"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(InputError, match="--precision bf16 needs a CUDA or MPS device; on cpu use fp32"):
        resolve_precision("bf16", torch.device("cpu"))
    with pytest.raises(InputError, match="--precision bf16: this MPS device has no bf16"):
        resolve_precision("bf16", torch.device("mps"))
    assert not supports_bf16(torch.device("cpu"))


def test_under_torchrun_auto_is_the_ranks_cuda_gpu_or_the_cpu(machine, monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # the group is not joined here

    machine(cuda=True, mps=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    context, device = distributed.init_distributed("auto")
    assert (context.rank, context.world_size) == (1, 2)
    assert device == torch.device("cuda", 1) and calls == [device]

    machine(cuda=False, mps=True)
    assert distributed.init_distributed("auto")[1] == torch.device("cpu")  # gloo has no MPS
    with pytest.raises(InputError, match="--device mps: DistributedDataParallel has no MPS backend"):
        distributed.init_distributed("mps")
