"""Score captions with the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE with --spice).

Caption a feature file with a checkpoint (or an export.py directory) and score against the file's own captions:
    python evaluate.py --checkpoint out/coco_prefix-009.pt --features data/coco_test.pkl --output metrics.json
Score a COCO results file against a COCO captions file, a Karpathy dataset_*.json split or a feature file:
    python evaluate.py --predictions preds.json --references dataset_coco.json --split test
"""

import argparse

from data.errors import exit_on_input_error
from models import quiet_transformers
from models.decoding import add_decoding_args
from models.device import DEVICE_HELP, PRECISION_HELP
from models.text_memory import add_text_memory_args
from stages.evaluate import DEFAULT_METRICS, METRIC_KEYS, run_evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("what to score")
    source.add_argument("--checkpoint", help="a checkpoint written by train.py, or a directory written by export.py; captions the images of --features")
    source.add_argument(
        "--features", help="feature file or store directory to caption (with --checkpoint); its captions are the references"
    )
    source.add_argument("--predictions", help='COCO results file [{"image_id", "caption"}] to score')
    source.add_argument(
        "--references",
        help="COCO captions file, Karpathy dataset_*.json (with --split), ClipCap caption list or feature file; "
        "with --checkpoint it replaces the feature file's own captions",
    )
    source.add_argument("--split", help="Karpathy split of --references: train, val, test, restval or train+restval")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        choices=[metric for metric in METRIC_KEYS if metric != "SPICE"],
        help="metric groups to compute, SPICE apart (--spice) (default: %(default)s)",
    )
    scoring.add_argument(
        "--spice", action="store_true", help="also compute SPICE (skipped, with the reason, if it cannot run)"
    )
    scoring.add_argument(
        "--allow_missing",
        action="store_true",
        help="score only the predicted images when some referenced images have no prediction",
    )
    scoring.add_argument(
        "--clip_score",
        metavar="MODEL",
        help="also CLIP-S and RefCLIP-S with this CLIP model (a name, id or directory with both towers)",
    )
    scoring.add_argument(
        "--clip_features", help="with --clip_score: a parse_coco_clip.py file of MODEL over the scored images"
    )
    scoring.add_argument(
        "--coco_images_dir", help="with --clip_score and no --clip_features: encode the images from this directory"
    )
    scoring.add_argument("--output", help="write scores, settings and per-image scores to this JSON file")
    add_decoding_args(parser)  # used with --checkpoint
    add_text_memory_args(parser)  # used with --checkpoint
    running = parser.add_argument_group("running the model (with --checkpoint)")
    running.add_argument("--batch_size", type=int, default=64, help="images decoded together")
    running.add_argument("--device", default="auto", help=DEVICE_HELP)
    running.add_argument("--precision", default="auto", help=f"fp32, bf16, fp16 or {PRECISION_HELP}")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """Caption (with --checkpoint) or read predictions, score them, print the table; returns the report."""
    return run_evaluation(args)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
