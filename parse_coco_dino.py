r"""Stage 1 with DINOv2: encode each image of a caption file once into a feature file ClipCap's train.py reads.

    python parse_coco_dino.py --dino_model_type dinov2_vitb14 --feature_type cls --coco_images_dir data/coco \
        --captions_file data/coco/annotations/train_caption.json --output_file data/coco/dino_train.pkl
"""

import argparse

from data.errors import exit_on_input_error
from models import quiet_transformers
from models.encoders import DINOV2_CROP_DIM, DINOV2_MODELS, DINOV2_RESIZE_DIM, FEATURE_TYPES
from stages.extract import add_extraction_arguments, run_extraction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ClipCap's DINOv2 fork, and those of the shared extraction routine."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dino_model_type",
        default="dinov2_vitb14",
        help=f"{', '.join(DINOV2_MODELS)}, or a transformers DINOv2 model id or local directory (default: %(default)s)",
    )
    parser.add_argument(
        "--feature_type",
        default="cls",
        choices=FEATURE_TYPES["dinov2"],
        help="cls: the final-norm CLS token; avg_patch: the mean patch token; cls_avg_patch: both; patch_tokens: "
        "the CLS and patch tokens (registers left out), one (T, D) matrix per image (default: %(default)s)",
    )
    parser.add_argument(
        "--resize_dim",
        type=int,
        default=DINOV2_RESIZE_DIM,
        help="short side after the bicubic resize (default: %(default)s)",
    )
    parser.add_argument(
        "--crop_dim", type=int, default=DINOV2_CROP_DIM, help="side of the center crop (default: %(default)s)"
    )
    add_extraction_arguments(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Extract DINOv2 features of the chosen type."""
    run_extraction(
        args,
        args.dino_model_type,
        "dinov2",
        feature_type=args.feature_type,
        resize_dim=args.resize_dim,
        crop_dim=args.crop_dim,
        output_suffix=f"_{args.feature_type}",
    )


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
