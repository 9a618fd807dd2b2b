"""Every GPU check in one call, for a lent CUDA machine: first the user's path through the real scripts
(extraction, one epoch of training, captioning, evaluation), then the GPU tests, then extraction, training,
decoding, alignment, cross-attention and 1B-LM benchmarks (real-size models, random weights, ClipCap's procedures beside ours), each a
section run as its own process with a time limit.

After every section the results so far go to gpu_check.json and gpu_check.md in --out_dir, so a run cut
short still leaves figures. Each section keeps the benchmark's own printed table; the Markdown file
lists them under the device's name.

    bash bench/gpu_check.sh                 # full: at most 7 minutes (section limits)
    bash bench/gpu_check.sh --quick         # at most 2.5 minutes
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/gpu_check.py`

from bench.bench_pipeline import why_evaluation_cannot_run  # noqa: E402

# The tests that need CUDA (they skip elsewhere); test files whose imports need pycocoevalcap are left
# out when it is missing (the GPU machine has torch and transformers only).
GPU_TESTS = ["tests/test_extraction.py", "tests/test_training.py", "tests/test_decoding.py", "tests/test_evaluate.py"]


# Seconds each section may take: the full run stays within 7 minutes, --quick within 2.5.
LIMITS = {
    False: {"pipeline": 90, "tests": 70, "extraction": 40, "training": 40, "decoding": 25, "alignment": 20, "xattn": 30, "lm": 40},
    True: {"pipeline": 40, "tests": 35, "extraction": 10, "training": 10, "decoding": 8, "alignment": 8, "xattn": 13, "lm": 8},
}


def sections(quick: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of every section, in order."""
    python = sys.executable
    limit = LIMITS[quick]
    images = "256" if quick else "1024"
    steps = "5" if quick else "20"
    decode_images = "256" if quick else "1024"
    return [
        (
            "user path: parse_coco_clip.py, train.py (1 epoch), predict.py, evaluate.py; ViT-B/32 + GPT-2 124M, bf16",
            [python, "bench/bench_pipeline.py", "--device", "cuda", "--precision", "bf16",
             "--num_images", "80" if quick else "320", "--num_workers", str(min(8, os.cpu_count() or 1))],
            limit["pipeline"],
        ),  # fmt: skip
        ("tests", [python, "-m", "pytest", "-q", "-m", "gpu", *available_test_files()], limit["tests"]),
        (
            "extraction ViT-B/32 and DINOv2-B/14, bf16",
            [python, "bench/bench_extract.py", "--device", "cuda", "--precision", "bf16", "--num_images", images,
             "--clipcap_captions", "40", "--batch_size", "128", "--num_workers", str(min(12, os.cpu_count() or 1))],
            limit["extraction"],
        ),  # fmt: skip
        *(
            (
                f"training batch {batch}, bf16",
                [python, "bench/bench_train.py", "--device", "cuda", "--batch_size", batch, "--steps", steps],
                limit["training"],
            )
            for batch in ("40", "256")
        ),
        *(
            (
                f"decoding batch {batch}, bf16",
                [python, "bench/bench_decode.py", "--device", "cuda", "--precision", "bf16", "--images", decode_images,
                 "--batch_size", batch, "--single_images", "16", "--clipcap_images", "8"],
                limit["decoding"],
            )  # fmt: skip
            for batch in ("64", "256")
        ),
        (
            "alignment (train_clip.py step) batch 256, bf16",
            [python, "bench/bench_align.py", "--device", "cuda", "--batch_size", "256", "--steps", steps],
            limit["alignment"],
        ),
        (
            "xattn vs MLP prefix, batch 64, beam 5, bf16",
            [python, "bench/bench_xattn.py", "--device", "cuda", "--batch_size", "64", "--steps", steps],
            limit["xattn"],
        ),
        (
            "1B-class LM (Llama 3.2-1B architecture) in bf16 weights: LoRA train step, beam 5 at batch 64",
            [python, "bench/bench_lm.py", "--device", "cuda", "--architectures", "llama-1b", "--tasks", "beam",
             "--fine_tunes", "lora", "--lora_architecture", "llama-1b", "--lm_dtype", "bf16", "--steps", "3" if quick else "10"],
            limit["lm"],
        ),  # fmt: skip
    ]


def available_test_files() -> list[str]:
    if why_evaluation_cannot_run():
        return [path for path in GPU_TESTS if path != "tests/test_evaluate.py"]
    return GPU_TESTS


def run_section(name: str, command: list[str], limit: int) -> dict:
    """Run one section; its output, exit status and seconds (rc 124 when it ran past its limit)."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
        output, rc = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as expired:
        output, rc = f"{expired.stdout or ''}{expired.stderr or ''}\n(stopped after {limit} s)", 124
    seconds = time.perf_counter() - start
    # The benchmarks' tables are their last lines; progress bars and warnings before them are noise.
    table = [line for line in output.splitlines() if line.strip() and "\r" not in line][-40:]
    print("\n".join(table[-15:]), flush=True)
    return {"section": name, "command": " ".join(command), "rc": rc, "seconds": round(seconds, 1), "output": table}


def write_reports(out_dir: Path, device: str, results: list[dict]) -> None:
    """gpu_check.json and gpu_check.md, rewritten whole after every section."""
    report = {"device": device, "sections": results}
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU check on {device}", "", "| section | rc | seconds |", "|---|---|---|"]
    lines += [f"| {result['section']} | {result['rc']} | {result['seconds']} |" for result in results]
    for result in results:
        lines += ["", f"## {result['section']}", "", f"`{result['command']}`", "", "```", *result["output"], "```"]
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and steps: about 2 minutes")
    parser.add_argument("--out_dir", default=os.environ.get("OUT", "."), help="where the JSON and Markdown go")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 1
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, command, limit in sections(args.quick):
        results.append(run_section(name, command, limit))
        write_reports(out_dir, device, results)
    failed = [result["section"] for result in results if result["rc"] != 0]
    print(f"gpu_check: {len(results) - len(failed)} of {len(results)} sections passed; reports in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
