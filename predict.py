"""Caption images (or a feature file) with a trained captioner, or with an original ClipCap state dict.

python predict.py photo.jpg more_photos/ "shots/*.png" --checkpoint out/coco-009.pt
python predict.py val2014/ --checkpoint out/coco-009.pt --output preds.json --sheet sheet.png
python predict.py --features coco_val.pkl --checkpoint out/coco-009.pt --output preds.json
python predict.py photo.jpg --weights coco_weights.pt --mapping_type mlp --prefix_length 10 --gpt2 gpt2
"""

import argparse

from data.errors import exit_on_input_error
from models.decoding import add_decoding_args
from models.mappers import MAPPERS
from stages.predict import run_prediction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR_OR_GLOB", help="image files, directories, globs")
    parser.add_argument("--checkpoint", help="a checkpoint written by train.py (its config names the encoder)")
    parser.add_argument("--features", help="caption this feature file (one caption per image row) instead of images")
    parser.add_argument("--output", help="write COCO results [{image_id, caption}] (the best caption) to this JSON")
    parser.add_argument("--sheet", help="draw the images with their captions into this picture (e.g. sheet.png)")
    parser.add_argument(
        "--sheet_max",
        type=int,
        default=64,
        help="draw at most this many images, the first ones (a sheet of all of COCO would not fit in memory)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (a GPU when there is one)")
    parser.add_argument("--batch_size", type=int, default=64, help="images encoded and decoded together")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or fp16 (CUDA); auto: bf16 on CUDA, else fp32")
    parser.add_argument("--num_workers", type=int, default=2, help="processes decoding image files")
    clipcap = parser.add_argument_group("original ClipCap weights (instead of --checkpoint)")
    clipcap.add_argument("--weights", help="a bare ClipCap state dict, e.g. coco_weights.pt")
    clipcap.add_argument("--mapping_type", choices=sorted(MAPPERS), default="mlp", help="the weights' mapper")
    clipcap.add_argument("--prefix_length", type=int, default=10, help="the weights' prefix length")
    clipcap.add_argument("--prefix_length_clip", type=int, default=10, help="transformer mapper: feature tokens")
    clipcap.add_argument("--num_layers", type=int, default=8, help="transformer mapper: layers")
    clipcap.add_argument("--normalize_prefix", action="store_true", help="the weights expect L2-normalized features")
    clipcap.add_argument(
        "--clip_model_type", default="ViT-B/32", help="the weights' image encoder: CLIP or DINOv2 name, id or directory"
    )
    clipcap.add_argument("--gpt2", default="gpt2", help="the LM (and tokenizer) the weights were trained on")
    add_decoding_args(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Caption as the flags say (see stages/predict.py)."""
    run_prediction(args)


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
