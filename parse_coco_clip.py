r"""Stage 1 with CLIP: encode each image of a caption file once into a feature file ClipCap's train.py reads.

    python parse_coco_clip.py --clip_model_type ViT-B/32 --coco_images_dir data/coco \
        --captions_file data/coco/annotations/train_caption.json --output_file data/coco/clip_train.pkl
"""

import argparse

from data.errors import exit_on_input_error
from models import quiet_transformers
from models.encoders import CLIP_MODELS, FEATURE_TYPES
from stages.extract import add_extraction_arguments, run_extraction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ClipCap's parse_coco.py, and those of the shared extraction routine."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--clip_model_type",
        default="ViT-B/32",
        help=f"{', '.join(CLIP_MODELS)}, or a transformers CLIP model id or local directory (default: %(default)s)",
    )
    parser.add_argument(
        "--feature_type",
        default=None,  # None, not image_embeds: a train_clip.py encoder directory gives its own ("projected")
        choices=FEATURE_TYPES["clip"],
        help="image_embeds: the projected CLS embedding, one vector per image; patch_tokens: the vision tower's "
        "last hidden states, CLS then patches, one (T, D) matrix per image (50 x 768 for ViT-B/32) "
        "(default: image_embeds)",
    )
    add_extraction_arguments(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Extract CLIP image embeddings (the projected `image_embeds`, as OpenAI CLIP's encode_image), or patch tokens."""
    suffix = f"_{args.feature_type}" if args.feature_type == "patch_tokens" else ""  # ClipCap's names stay as they were
    run_extraction(args, args.clip_model_type, "clip", feature_type=args.feature_type, output_suffix=suffix)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
