r"""Stage 0: align an image encoder to a CLIP text tower (symmetric InfoNCE, Recall@K on a validation split),
and keep the best epoch's encoder as a directory that the extraction scripts and predict.py load by path.

    python train_clip.py --captions_file data/coco/dataset_coco.json --images_dir data/coco --split train \
        --val_split val --image_encoder resnet50 --text_encoder ViT-B/32 --out_dir runs/align --epochs 10 --bs 256
    python parse_coco_clip.py --clip_model_type runs/align/encoder ...     # aligned features
    torchrun --nproc_per_node 4 train_clip.py ... --bs 64                   # one InfoNCE batch of 256
"""

import argparse
import os

from data.errors import exit_on_input_error
from data.options import add_options
from models import quiet_transformers
from models.device import DEVICE_HELP, PRECISION_HELP, PRECISIONS
from stages.align_sides import LOCAL_TOWERS
from stages.tracking import TRACKING_GROUP, TrackingOptions
from stages.train_clip import SCHEDULES, run_alignment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """train_clip.py's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--captions_file",
        required=True,
        help="annotations: a ClipCap caption list, COCO captions or a Karpathy dataset_*.json",
    )
    data.add_argument("--images_dir", required=True, help="directory the annotations' image paths are relative to")
    data.add_argument("--split", default=None, help="Karpathy split to train on: train, restval, train+restval, ...")
    data.add_argument("--val_split", default=None, help="Karpathy split for Recall@K every epoch (e.g. val)")
    data.add_argument(
        "--val_captions_file",
        default=None,
        help="validation annotations, when not the --captions_file (COCO's val file)",
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--image_encoder",
        default="resnet50",
        help=f"{', '.join(LOCAL_TOWERS)}, or a CLIP / DINOv2 name, transformers id or directory (default: %(default)s)",
    )
    models.add_argument("--no_pretrained", action="store_true", help="resnet50 only: random init, not ImageNet weights")
    models.add_argument(
        "--text_encoder",
        default="ViT-B/32",
        help="a CLIP name, id or directory with a text tower (default: %(default)s)",
    )
    models.add_argument(
        "--train_text", action="store_true", help="train the text tower too (default: frozen, its embeddings cached)"
    )
    models.add_argument(
        "--image_size", type=int, default=None, help="input side in pixels (default: 224, or the named model's own)"
    )
    models.add_argument(
        "--projection_hidden",
        type=int,
        default=None,
        help="hidden width of the projection head (default: tower width / 2)",
    )
    models.add_argument(
        "--cnn_channels", type=int, nargs="+", default=[32, 64, 128], help="tiny_cnn: width of each convolution"
    )
    models.add_argument(
        "--cnn_stem", type=int, default=4, help="tiny_cnn: patch side (and stride) of the first convolution"
    )
    training = parser.add_argument_group("training")
    training.add_argument("--out_dir", required=True, help="run directory: encoder/, retrieval.json, checkpoints, log")
    training.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    training.add_argument(
        "--bs",
        dest="batch_size",
        type=int,
        default=256,
        help="images (and captions) per batch and process (under torchrun one InfoNCE batch of them all)",
    )
    training.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default: %(default)s)")
    training.add_argument(
        "--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on the temperature)"
    )
    training.add_argument("--warmup_steps", type=int, default=0, help="linear warmup steps")
    training.add_argument("--schedule", default="cosine", choices=sorted(SCHEDULES), help="decay after warmup")
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0: none)")
    training.add_argument("--seed", type=int, default=0, help="initial weights, epoch order and caption draws")
    training.add_argument("--resume", default=None, help="continue from align_latest.pt (the file or --out_dir)")
    training.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out_dir")
    training.add_argument(
        "--save_latest_every",
        type=int,
        default=1000,
        help="steps between resume checkpoints within an epoch (0: epoch ends only)",
    )
    training.add_argument(
        "--cache_dir", default=None, help="text-embedding cache (default: train.py's cache directory)"
    )
    running = parser.add_argument_group("running")
    running.add_argument(
        "--cache_images",
        action="store_true",
        help="decode the training images once and keep their pixels in memory (small sets: N x 3 x size^2 floats)",
    )
    running.add_argument("--eval_batch_size", type=int, default=256, help="images and captions per validation pass")
    running.add_argument(
        "--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes decoding images"
    )
    running.add_argument("--device", default="auto", help=DEVICE_HELP)
    running.add_argument(
        "--precision",
        default="auto",
        choices=("auto", *PRECISIONS),
        help=PRECISION_HELP,
    )
    add_options(parser, TrackingOptions, TRACKING_GROUP)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """Align, and print the retrieval table; returns retrieval.json's record."""
    return run_alignment(args)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
