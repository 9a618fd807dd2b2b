"""Stage 2: train a mapper from image features to a GPT-2 prefix (ClipCap's train.py flags).

python train.py --data features_train.pkl --out_dir runs/coco --prefix coco_prefix
torchrun --nproc_per_node 4 train.py --data ... --bs 40          # DistributedDataParallel
"""

import argparse

from data.errors import exit_on_input_error
from models.captioner import ClipCaptionModel
from models.device import PRECISIONS
from models.mappers import MAPPERS
from stages.train import run_training
from stages.train_options import TrainingOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """train.py's flags: ClipCap's names first, then this repo's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    clipcap = parser.add_argument_group("ClipCap's flags")
    clipcap.add_argument(
        "--data",
        required=True,
        help="training feature file (from parse_coco_clip.py / parse_coco_dino.py, or ClipCap's .pkl)",
    )
    clipcap.add_argument(
        "--out_dir", default="./checkpoints", help="directory for checkpoints, config JSON and the loss log"
    )
    clipcap.add_argument("--prefix", default="coco_prefix", help="file-name prefix of this run's outputs")
    clipcap.add_argument("--epochs", type=int, default=10, help="passes over the training captions")
    clipcap.add_argument(
        "--save_every",
        type=int,
        default=1,
        help="save {prefix}-{epoch:03d}.pt every N epochs (the last is always saved)",
    )
    clipcap.add_argument("--prefix_length", type=int, default=10, help="P: LM embeddings the mapper produces")
    clipcap.add_argument(
        "--prefix_length_clip", type=int, default=10, help="transformer mapper: tokens the image feature becomes"
    )
    clipcap.add_argument(
        "--bs", dest="batch_size", type=int, default=40, help="captions per batch (per process under torchrun)"
    )
    clipcap.add_argument(
        "--only_prefix", action="store_true", help="train the mapper only; the LM stays frozen and out of checkpoints"
    )
    clipcap.add_argument("--mapping_type", default="mlp", choices=sorted(MAPPERS), help="mapper architecture")
    clipcap.add_argument("--num_layers", type=int, default=8, help="transformer mapper depth")
    clipcap.add_argument(
        "--normalize_prefix", action="store_true", help="L2-normalize image features before the mapper"
    )
    clipcap.add_argument(
        "--use_dino",
        action="store_true",
        help="the features are DINOv2's (checked against the file's meta when it has one)",
    )
    clipcap.add_argument(
        "--dino_model_type",
        default=None,
        help="DINOv2 model the features came from (checked against the file's meta; the encoder is recorded from the meta)",
    )
    clipcap.add_argument(
        "--dino_feature_dim",
        type=int,
        default=None,
        help="expected feature width, checked against the file (the width always comes from the file)",
    )
    ours = parser.add_argument_group("this repo's flags")
    ours.add_argument(
        "--gpt2", default="gpt2", help="causal LM: transformers id (gpt2, gpt2-medium, distilgpt2) or local directory"
    )
    ours.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate")
    ours.add_argument("--warmup_steps", type=int, default=5000, help="linear warmup steps, then linear decay to 0")
    ours.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (ClipCap: 0)")
    ours.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)"
    )
    ours.add_argument(
        "--val_data", default=None, help="validation feature file: loss per caption token after each epoch"
    )
    ours.add_argument(
        "--eval_every",
        type=int,
        default=0,
        help="every N epochs (and the last), greedy-decode --val_data, log CIDEr and BLEU-4, keep {prefix}_best.pt (0: off)",
    )
    ours.add_argument(
        "--precision", default="auto", choices=["auto", *PRECISIONS], help="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    ours.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    ours.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    ours.add_argument(
        "--seed", type=int, default=0, help="seed of the mapper's initial weights, the data order and dropout"
    )
    ours.add_argument(
        "--save_latest_every",
        type=int,
        default=10_000,
        help="save {prefix}_latest.pt every N steps (and after every epoch)",
    )
    ours.add_argument(
        "--resume",
        default=None,
        metavar="PATH_OR_DIR",
        help="continue from a {prefix}_latest.pt, or the directory holding it",
    )
    ours.add_argument(
        "--overwrite",
        action="store_true",
        help="start over even if --out_dir holds a run with this --prefix (its files are deleted)",
    )
    ours.add_argument(
        "--cache_dir",
        default=None,
        help="where tokenized captions are cached (default $CLIPCAP_PLUS_CACHE_DIR or ~/.cache/clipcap-plus)",
    )
    ours.add_argument(
        "--max_caption_chars",
        type=int,
        default=2000,
        help="captions longer than this many characters are dropped (and counted) before tokenizing",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> ClipCaptionModel:
    """Train and return the model (the checkpoints are in --out_dir)."""
    return run_training(TrainingOptions(**vars(args)))


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
