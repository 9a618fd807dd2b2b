"""The user's path, script by script, on real-size models with random weights: parse_coco_clip.py over
generated JPEGs, one epoch of train.py, predict.py on the test images, then evaluate.py where pycocoevalcap
(and Java) are installed. Each script runs in a process of its own, as a user runs it; its wall time
(start-up and imports included) and peak GPU memory are printed.

Models: CLIP ViT-B/32's vision tower and GPT-2 124M (vocabulary 50257), built from configs, saved and
loaded by path; a byte-level BPE trained on the captions. Images: the synthetic set's 224-pixel JPEGs
(data/synthetic.py), 5 captions each, four in five for training and the rest for the test split.

    python bench/bench_pipeline.py --device cuda --precision bf16     # the GPU check's first section
    python bench/bench_pipeline.py --device cpu --num_images 10 --tiny # a smoke run on tiny models
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/bench_pipeline.py`

from bench.peak_memory import MARKER  # noqa: E402
from data.annotations import read_annotations  # noqa: E402
from data.errors import InputError, exit_on_input_error  # noqa: E402
from data.synthetic import generate_dataset  # noqa: E402
from models.device import DEVICE_HELP, PRECISION_HELP, PRECISIONS  # noqa: E402
from models.tiny import save_tiny_clip, save_tiny_gpt2  # noqa: E402

# (CLIP vision tower, GPT-2) sizes: ViT-B/32 and GPT-2 124M, or tiny ones for a smoke run.
MODEL_SIZES = {
    False: (
        {"patch_size": 32, "hidden_size": 768, "num_layers": 12, "projection_dim": 512},
        {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "max_positions": 1024, "model_vocab_size": 50257},
    ),
    True: ({"patch_size": 32}, {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help=PRECISION_HELP)
    parser.add_argument("--num_images", type=int, default=320, help="generated images (5 captions each)")
    parser.add_argument("--batch_size", type=int, default=40, help="train.py's --bs (captions per step)")
    parser.add_argument("--num_workers", type=int, default=4, help="image-decoding processes of extraction")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of real sizes (a smoke run)")
    parser.add_argument("--work_dir", default=None, help="where the set, models and outputs go (default: temporary)")
    return parser.parse_args(argv)


def build_models(work_dir: Path, dataset_path: Path, tiny: bool) -> tuple[Path, Path]:
    """The CLIP vision tower and the GPT-2 (with a tokenizer trained on the training captions), by path."""
    clip_size, lm_size = MODEL_SIZES[tiny]
    clip_dir = save_tiny_clip(work_dir / "clip", **clip_size)
    captions = [caption for record in read_annotations(dataset_path, "train") for caption in record.captions]
    lm_dir = save_tiny_gpt2(work_dir / "gpt2", captions, **lm_size)
    return clip_dir, lm_dir


def stage_commands(args: argparse.Namespace, work_dir: Path, dataset_path: Path, clip_dir: Path, lm_dir: Path):
    """(stage, script argv) of the user's path, in order."""
    device = ("--device", args.device, "--precision", args.precision)
    images_dir = dataset_path.parent
    commands = [
        (
            "parse_coco_clip.py (train split)",
            [
                *("parse_coco_clip.py", "--clip_model_type", str(clip_dir), "--coco_images_dir", str(images_dir)),
                *("--captions_file", str(dataset_path), "--split", "train", "--output_file", str(work_dir / "train.pkl")),
                *("--batch_size", "128", "--num_workers", str(args.num_workers), *device),
            ],
        ),
        (
            "train.py (1 epoch)",
            [
                *("train.py", "--data", str(work_dir / "train.pkl"), "--gpt2", str(lm_dir), "--epochs", "1"),
                *("--bs", str(args.batch_size), "--lr", "1e-4", "--warmup_steps", "10"),
                *("--out_dir", str(work_dir / "run"), "--prefix", "bench", "--cache_dir", str(work_dir / "cache"), *device),
            ],
        ),
        (
            "predict.py (beam 5, test images)",
            [
                *("predict.py", str(images_dir / "test"), "--checkpoint", str(work_dir / "run" / "bench-000.pt")),
                *("--decode", "beam", "--batch_size", "64", "--output", str(work_dir / "predictions.json"), *device),
            ],
        ),
    ]
    evaluation = [
        *("evaluate.py", "--predictions", str(work_dir / "predictions.json"), "--references", str(dataset_path)),
        *("--split", "test", "--output", str(work_dir / "metrics.json")),
    ]
    commands.append(("evaluate.py (test split)", evaluation))
    return commands


def why_evaluation_cannot_run() -> str | None:
    """The reason evaluate.py cannot run here (pycocoevalcap or Java missing), or None."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed"
    if shutil.which("java") is None:
        return "java is not on the PATH"
    return None


def run_stage(name: str, argv: list[str]) -> dict:
    """One script in its own process: its wall time and peak GPU memory; a failure is one line."""
    print(f"== {name}: python {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "peak_memory.py"), *argv], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    lines = result.stdout.splitlines()
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or lines or ["no output"])[-1]
        raise InputError(f"{name} failed with exit status {result.returncode}: {reason}")
    peak = json.loads(next(line for line in reversed(lines) if line.startswith(MARKER)).removeprefix(MARKER))
    return {"stage": name, "seconds": round(seconds, 1), "peak_gpu_mib": peak["cuda_mib"]}


def run_pipeline(args: argparse.Namespace, work_dir: Path) -> list[dict]:
    """Generate the set and the models, then every stage in order; one record per stage."""
    num_test = max(1, args.num_images // 5)
    dataset_path = generate_dataset(
        work_dir / "synthetic", num_train=args.num_images - num_test, num_val=0, num_test=num_test, progress=False
    )
    clip_dir, lm_dir = build_models(work_dir, dataset_path, args.tiny)
    skip_evaluation = why_evaluation_cannot_run()
    results = []
    for name, argv in stage_commands(args, work_dir, dataset_path, clip_dir, lm_dir):
        if argv[0] == "evaluate.py" and skip_evaluation:
            results.append({"stage": name, "skipped": skip_evaluation})
            continue
        results.append(run_stage(name, argv))
    return results


def format_table(results: list[dict]) -> str:
    """The figures as a Markdown table."""
    lines = ["| stage | wall s | peak GPU MiB |", "|---|---|---|"]
    for record in results:
        if "skipped" in record:
            lines.append(f"| {record['stage']} | skipped: {record['skipped']} | |")
        else:
            lines.append(f"| {record['stage']} | {record['seconds']} | {record['peak_gpu_mib']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    """Run the path and print its table, then the figures as one JSON line."""
    if args.num_images < 2:
        raise InputError(f"--num_images {args.num_images}: needs at least 2 (training and test images)")
    if args.work_dir:
        results = run_pipeline(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as work_dir:
            results = run_pipeline(args, Path(work_dir))
    size = "tiny models" if args.tiny else "CLIP ViT-B/32 + GPT-2 124M, random weights"
    print(f"\n{args.num_images} images, {size}, --device {args.device} --precision {args.precision}")
    print(format_table(results))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
