r"""Stage 0: align an image encoder to a CLIP text tower (symmetric InfoNCE, Recall@K on a validation split),
and keep the best epoch's encoder as a directory that the extraction scripts and predict.py load by path.

    python train_clip.py --captions_file data/coco/dataset_coco.json --images_dir data/coco --split train \
        --val_split val --image_encoder resnet50 --text_encoder ViT-B/32 --out_dir runs/align --epochs 10 --bs 256
    python parse_coco_clip.py --clip_model_type runs/align/encoder ...     # aligned features
    torchrun --nproc_per_node 4 train_clip.py ... --bs 64                   # one InfoNCE batch of 256
"""

from data.errors import exit_on_input_error
from data.options import build_parser, parse_options
from models import quiet_transformers
from stages.train_clip import run_alignment
from stages.train_clip_options import GROUPS, AlignmentOptions


def parse_args(argv: list[str] | None = None) -> AlignmentOptions:
    """train_clip.py's flags (stages/train_clip_options.py defines each one)."""
    return parse_options(AlignmentOptions, build_parser(AlignmentOptions, __doc__, GROUPS), argv)


def main(args: AlignmentOptions) -> dict:
    """Align, and print the retrieval table; returns retrieval.json's record."""
    return run_alignment(args)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
