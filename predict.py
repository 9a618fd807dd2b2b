"""Caption images (or a feature file) with a trained captioner, or with an original ClipCap state dict.

python predict.py photo.jpg more_photos/ "shots/*.png" --checkpoint out/coco-009.pt
python predict.py val2014/ --checkpoint out/coco-009.pt --output preds.json --sheet sheet.png
python predict.py --features coco_val.pkl --checkpoint out/coco-009.pt --output preds.json
python predict.py photo.jpg --checkpoint exports/coco_mlp                  # a directory written by export.py
python predict.py photo.jpg --checkpoint runs/text/text-009.pt --text_memory coco_text.pkl   # DeCap
python predict.py photo.jpg --weights coco_weights.pt --mapping_type mlp --prefix_length 10 --gpt2 gpt2
"""

import argparse

from data.errors import exit_on_input_error
from models import quiet_transformers
from models.decoding import add_decoding_args
from models.device import DEVICE_HELP, PRECISION_HELP
from models.mappers import PREFIX_MAPPERS
from models.text_memory import add_text_memory_args
from stages.predict import run_prediction

# The settings an original ClipCap state dict cannot tell by itself, and their defaults.
WEIGHTS_DEFAULTS = {
    "mapping_type": "mlp",
    "prefix_length": 10,
    "prefix_length_clip": 10,
    "num_layers": 8,
    "normalize_prefix": False,
    "clip_model_type": "ViT-B/32",
    "lm": "gpt2",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR_OR_GLOB", help="image files, directories, globs")
    parser.add_argument("--checkpoint", help="a checkpoint written by train.py, or a directory written by export.py (its config names the encoder)")
    parser.add_argument("--features", help="caption this feature file or store directory (one caption per image row) instead of images")
    parser.add_argument("--output", help="write COCO results [{image_id, caption}] (the best caption) to this JSON")
    parser.add_argument("--sheet", help="draw the images with their captions into this picture (e.g. sheet.png)")
    parser.add_argument(
        "--sheet_max",
        type=int,
        default=64,
        help="draw at most this many images, the first ones (a sheet of all of COCO would not fit in memory)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--batch_size", type=int, default=64, help="images encoded and decoded together")
    parser.add_argument("--precision", default="auto", help=f"fp32, bf16, fp16 or {PRECISION_HELP}")
    parser.add_argument("--num_workers", type=int, default=2, help="processes decoding image files")
    clipcap = parser.add_argument_group(
        "original ClipCap weights (instead of --checkpoint, whose config records all of these)"
    )
    clipcap.add_argument("--weights", help="a bare ClipCap state dict, e.g. coco_weights.pt")
    # Defaults None: a flag given with --checkpoint is refused, not silently ignored; the real defaults
    # are filled in after that check (WEIGHTS_DEFAULTS).
    clipcap.add_argument("--mapping_type", choices=PREFIX_MAPPERS, help="the weights' mapper (default: mlp)")
    clipcap.add_argument("--prefix_length", type=int, help="the weights' prefix length (default: 10)")
    clipcap.add_argument("--prefix_length_clip", type=int, help="transformer mapper: feature tokens (default: 10)")
    clipcap.add_argument("--num_layers", type=int, help="transformer mapper: layers (default: 8)")
    clipcap.add_argument(
        "--normalize_prefix", action="store_true", default=None, help="the weights expect L2-normalized features"
    )
    clipcap.add_argument(
        "--clip_model_type", help="the weights' image encoder: CLIP or DINOv2 name, id or directory (default: ViT-B/32)"
    )
    clipcap.add_argument(
        "--lm", "--gpt2", help="the LM (and tokenizer) the weights were trained on; --gpt2 is ClipCap's name (default: gpt2)"
    )
    add_decoding_args(parser)
    add_text_memory_args(parser)
    args = parser.parse_args(argv)
    given = [name for name in WEIGHTS_DEFAULTS if getattr(args, name) is not None]
    if args.checkpoint is not None and given:
        parser.error(f"--{given[0]} is a setting of --weights; with --checkpoint the checkpoint's config decides it")
    for name, default in WEIGHTS_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(args: argparse.Namespace) -> None:
    """Caption as the flags say (see stages/predict.py)."""
    run_prediction(args)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
