"""What parse_coco_clip.py and parse_coco_dino.py share: their common flags and the run itself."""

import argparse
import os
from pathlib import Path

from data.annotations import read_annotations
from data.errors import InputError
from data.extraction import ExtractionResult, extract_features
from models.encoders import load_encoder
from models.runtime import close_distributed, init_distributed, resolve_precision

MAX_SKIPPED_SHOWN = 20  # the rest is in the *.skipped.json report


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of both extraction scripts (ClipCap's names)."""
    parser.add_argument(
        "--coco_images_dir",
        default="./data/coco",
        help="directory of the images: COCO's train2014/ and val2014/, or Flickr's images (default: %(default)s)",
    )
    parser.add_argument(
        "--captions_file",
        default="./data/coco/annotations/train_caption.json",
        help="annotations: a ClipCap caption list, COCO captions, or a Karpathy dataset_*.json (default: %(default)s)",
    )
    parser.add_argument(
        "--output_file",
        default=None,
        help="feature file to write (default: ./data/coco/oscar_split_<model>_<split or train>.pkl)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="Karpathy files only: train, val, test, restval or train+restval (the usual 113k-image training set)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoder pass (default: %(default)s)")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader processes decoding images; 0 decodes in the main process (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda if available)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast precision on CUDA; auto is bf16 on CUDA and fp32 on CPU",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its partial results (<output_file>.partial/) without re-encoding them",
    )
    parser.add_argument(
        "--checkpoint_every",
        type=int,
        default=2000,
        help="save partial results every N images, for --resume (default: %(default)s)",
    )


def default_output_file(model_name: str, split: str | None, suffix: str = "") -> Path:
    """ClipCap's naming: ./data/coco/oscar_split_ViT-B_32_train.pkl."""
    name = Path(model_name).name if os.path.isdir(model_name) else model_name.replace("/", "_")
    return Path("./data/coco") / f"oscar_split_{name}{suffix}_{split or 'train'}.pkl"


def _check_arguments(args: argparse.Namespace) -> None:
    if not Path(args.coco_images_dir).is_dir():
        raise InputError(f"--coco_images_dir {args.coco_images_dir}: no such directory")
    for flag in ("batch_size", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.num_workers < 0:
        raise InputError(f"--num_workers {args.num_workers}: must be 0 or more")


def print_summary(result: ExtractionResult, output_file: Path) -> None:
    """Rows, captions, and every skipped image (the first few on screen, all in the report)."""
    features = result.features
    print(
        f"wrote {output_file}: {features.embeddings.shape[0]} images x {features.feature_dim} features, "
        f"{len(features.captions)} captions; {len(result.skipped)} images skipped"
    )
    for entry in result.skipped[:MAX_SKIPPED_SHOWN]:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    if len(result.skipped) > MAX_SKIPPED_SHOWN:
        print(f"  ... {len(result.skipped) - MAX_SKIPPED_SHOWN} more")
    if result.skipped:
        print(f"skipped images are listed in {result.skipped_file}")


def run_extraction(
    args: argparse.Namespace,
    model_name: str,
    family: str,
    *,
    feature_type: str | None = None,
    resize_dim: int | None = None,
    crop_dim: int | None = None,
    output_suffix: str = "",
) -> ExtractionResult | None:
    """Read annotations, load the encoder, encode (under torchrun: this process's share), and report.
    `output_suffix` goes into the default output name (e.g. the DINOv2 feature type)."""
    _check_arguments(args)
    context, device = init_distributed(args.device)
    try:
        precision = resolve_precision(args.precision, device)
        records = read_annotations(args.captions_file, args.split, args.coco_images_dir)
        encoder, preprocess = load_encoder(
            model_name, family=family, feature_type=feature_type, resize_dim=resize_dim, crop_dim=crop_dim
        )
        output_file = Path(args.output_file or default_output_file(model_name, args.split, output_suffix))
        if context.is_main:
            config = {**vars(args), "output_file": str(output_file), "device": str(device), "precision": precision}
            config.update(world_size=context.world_size, images=len(records), encoder=encoder.spec.to_dict())
            print("config:", *(f"  {key}: {value}" for key, value in config.items()), sep="\n")
        result = extract_features(
            records,
            args.coco_images_dir,
            encoder,
            preprocess,
            output_file,
            captions_file=args.captions_file,
            split=args.split,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            precision=precision,
            context=context,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
        )
        if result is not None:
            print_summary(result, output_file)
        return result
    finally:
        close_distributed()
