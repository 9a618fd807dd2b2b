"""Score captions with the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE with --spice).

Caption a feature file with a checkpoint and score against the file's own captions:
    python evaluate.py --checkpoint out/coco_prefix-009.pt --features data/coco_test.pkl --output metrics.json
Score a COCO results file against a COCO captions file, a Karpathy dataset_*.json split or a feature file:
    python evaluate.py --predictions preds.json --references dataset_coco.json --split test
"""

import argparse
from dataclasses import asdict

from data.atomic import write_json_atomic
from data.errors import InputError, exit_on_input_error
from data.features import read_feature_file
from data.references import check_matching_ids, describe_empty_captions, load_references, read_predictions
from models.checkpoint import load_checkpoint, load_tokenizer
from models.decoding import add_decoding_args, decoding_options_from_args
from models.prediction import caption_feature_file, check_feature_width
from models.runtime import resolve_device, resolve_precision
from models.scoring import (
    DEFAULT_METRICS,
    METRIC_KEYS,
    check_metrics,
    format_table,
    metrics_report,
    require_java,
    score_captions,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("what to score")
    source.add_argument("--checkpoint", help="a checkpoint written by train.py; captions the images of --features")
    source.add_argument(
        "--features", help="feature file to caption (with --checkpoint); its captions are the references"
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
        help="metric groups to compute (default: all of them; SPICE with --spice)",
    )
    scoring.add_argument(
        "--spice", action="store_true", help="also compute SPICE (skipped, with the reason, if it cannot run)"
    )
    scoring.add_argument(
        "--allow_missing",
        action="store_true",
        help="score only the predicted images when some referenced images have no prediction",
    )
    scoring.add_argument("--output", help="write scores, settings and per-image scores to this JSON file")
    add_decoding_args(parser)  # used with --checkpoint
    running = parser.add_argument_group("running the model (with --checkpoint)")
    running.add_argument("--batch_size", type=int, default=64, help="images decoded together")
    running.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    running.add_argument("--precision", default="auto", help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    return parser.parse_args(argv)


def _check_sources(args: argparse.Namespace) -> None:
    if args.checkpoint is not None:
        if args.features is None or args.predictions is not None:
            raise InputError("--checkpoint needs --features (the images to caption) and no --predictions")
    elif args.predictions is None or args.references is None or args.features is not None:
        raise InputError("give --checkpoint X.pt --features FILE, or --predictions FILE --references FILE")
    if args.batch_size < 1:
        raise InputError(f"--batch_size {args.batch_size}: must be at least 1")


def main(args: argparse.Namespace) -> dict:
    """Caption (with --checkpoint) or read predictions, score them, print the table; returns the report."""
    _check_sources(args)
    metrics = check_metrics([*args.metrics, *(["SPICE"] if args.spice else [])])
    print("evaluate.py:", ", ".join(f"{name}={value}" for name, value in vars(args).items()))
    require_java()  # before any decoding: every metric tokenizes with Java
    references_name = args.references or args.features
    all_references = load_references(references_name, args.split)
    if args.checkpoint is not None:
        options = decoding_options_from_args(args)
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        feature_file = read_feature_file(args.features)
        predicted_ids, predictions_name = feature_file.image_rows(), f"the images of {args.features}"
    else:
        predictions = read_predictions(args.predictions)
        predicted_ids, predictions_name = predictions, args.predictions
    # Ids are paired before decoding, which can take long, so that a mismatch fails at once.
    references = check_matching_ids(
        predicted_ids,
        all_references,
        allow_missing=args.allow_missing,
        predictions_name=predictions_name,
        references_name=references_name,
    )
    split = args.split if args.checkpoint is None else feature_file.meta.get("split")
    settings = {
        "metrics": list(metrics),
        "references": references_name,
        "split": split,
        "image_count": len(references),
        "images_without_prediction": len(all_references) - len(references),  # > 0 only with --allow_missing
    }
    if args.checkpoint is not None:
        model = load_checkpoint(args.checkpoint, map_location=device).to(device)
        check_feature_width(feature_file.feature_dim, model, args.features)
        captioned = caption_feature_file(
            model,
            load_tokenizer(model.config.lm_name),
            feature_file,
            options,
            batch_size=args.batch_size,
            device=device,
            precision=precision,
            progress=True,
        )
        predictions = {image_id: captions[0] for image_id, captions in captioned}  # the best caption of each image
        settings.update(
            checkpoint=args.checkpoint, features=args.features, decoding=asdict(options), precision=precision
        )
    else:
        settings.update(predictions=args.predictions)
    if (warning := describe_empty_captions(predictions, predictions_name)) is not None:
        print(warning)
    scores = score_captions({image_id: predictions[image_id] for image_id in references}, references, metrics)
    report = metrics_report(scores, predictions, settings)
    print(format_table(report))
    if settings["images_without_prediction"]:
        print(f"left out (--allow_missing): {settings['images_without_prediction']} images without a prediction")
    if args.output:
        write_json_atomic(args.output, report)
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
