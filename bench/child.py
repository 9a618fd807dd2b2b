"""One benchmark variant in a process of its own, so that its peak memory is its own and a crash (or
memory running out) costs that variant alone."""

import argparse
import json
import resource
import subprocess
import sys

import torch


def run_variant_process(script: str, variant: str) -> tuple[dict | None, str]:
    """Run `script` again with this command line plus `--variant VARIANT`: (its figures, the JSON of its
    last printed line, and "") on success, (None, the last line it wrote to stderr) on failure."""
    command = [sys.executable, script, *sys.argv[1:], "--variant", variant]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None, (result.stderr.strip().splitlines() or ["(no message)"])[-1]
    return json.loads(result.stdout.strip().splitlines()[-1]), ""


def peak_mib(device: torch.device) -> float:
    """This process's peak memory so far: allocated on CUDA, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def print_run_header(args: argparse.Namespace, device: torch.device) -> None:
    """A benchmark's settings (its flags, as JSON) and the machine it runs on, before its table."""
    print(json.dumps({key: value for key, value in vars(args).items() if key != "variant"}), flush=True)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {machine}, torch {torch.__version__}", flush=True)
