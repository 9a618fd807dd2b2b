"""Run a script as `python SCRIPT ARGS...` does, then print its peak CUDA memory as the last line:

    python bench/peak_memory.py train.py --data ...     # ... then `peak_memory: {"cuda_mib": 1234.5}`
"""

import json
import runpy
import sys
from pathlib import Path

import torch

MARKER = "peak_memory: "


def main() -> None:
    script, *arguments = sys.argv[1:]
    sys.argv = [script, *arguments]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python SCRIPT` puts the script's folder first
    try:
        runpy.run_path(script, run_name="__main__")
    finally:  # also after the script's own sys.exit, so a failed stage still reports what it used
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0
        print(MARKER + json.dumps({"cuda_mib": round(peak / 2**20, 1)}), flush=True)


if __name__ == "__main__":
    main()
