"""Stage 2: train a mapper from image features to a GPT-2 prefix (ClipCap's train.py flags), or a
GPT-2 that cross-attends to patch tokens (--mapping_type xattn).

python train.py --data features_train.pkl --out_dir runs/coco --prefix coco_prefix
python train.py --data patch_tokens_train --mapping_type xattn --only_prefix --out_dir runs/xattn --prefix xattn
torchrun --nproc_per_node 4 train.py --data ... --bs 40          # DistributedDataParallel
python train.py --scst --init_from runs/coco/coco_prefix_best.pt --data features_train.pkl \
    --out_dir runs/coco_scst --prefix coco_scst --reward cider --lr 1e-5 --bs 50   # SCST (Stage 2b)
"""

import argparse

from data.errors import exit_on_input_error
from models.captioner import ClipCaptionModel
from models.device import DEVICE_HELP, PRECISION_HELP, PRECISIONS
from models.mappers import MAPPERS
from stages.rewards import BASELINES, REWARDS
from stages.scst import ScstTrainer
from stages.tracking import add_tracking_arguments
from stages.train import Trainer, run_training
from stages.train_options import TrainingOptions

# The model's flags: under --scst the --init_from checkpoint decides them, so they must not be given
# (their parser default is None, to tell "given" from "left at the default").
MODEL_DEFAULTS = {
    "prefix_length": 10,
    "prefix_length_clip": 10,
    "only_prefix": False,
    "mapping_type": "mlp",
    "num_layers": 8,
    "normalize_prefix": False,
    "use_dino": False,
    "dino_model_type": None,
    "dino_feature_dim": None,
    "gpt2": "gpt2",
}
# The prefix mappers' own flags.
PREFIX_MAPPER_DEFAULTS = {name: MODEL_DEFAULTS[name] for name in ("prefix_length", "prefix_length_clip", "num_layers")}
SCST_DEFAULTS = {
    "init_from": None,
    "reward": "cider",
    "baseline": "mean",
    "scst_samples": 5,
    "max_length": 20,
    "clip_model": None,
    "clip_features": None,
    "clip_weight": 1.0,
}
WARMUP_STEPS = {False: 5000, True: 0}  # ClipCap's warmup; none under --scst (a constant rate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """train.py's flags: ClipCap's names first, then this repo's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    clipcap = parser.add_argument_group("ClipCap's flags")
    clipcap.add_argument(
        "--data",
        required=True,
        help="training features (from parse_coco_clip.py / parse_coco_dino.py): a .pkl (ClipCap's too) or a store directory",
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
    clipcap.add_argument("--prefix_length", type=int, help="P: LM embeddings the mapper produces (default 10)")
    clipcap.add_argument(
        "--prefix_length_clip", type=int, help="transformer mapper: tokens the image feature becomes (default 10)"
    )
    clipcap.add_argument(
        "--bs",
        dest="batch_size",
        type=int,
        default=40,
        help="captions per batch (per process under torchrun); images per batch under --scst",
    )
    clipcap.add_argument(
        "--only_prefix",
        action="store_true",
        default=None,
        help="train the mapper only (xattn: and the new cross-attention layers); the LM stays frozen and out of checkpoints",
    )
    clipcap.add_argument(
        "--mapping_type",
        choices=sorted(MAPPERS),
        help="mapper architecture (default mlp); xattn: GPT-2 gains cross-attention layers over a projection of "
        "patch-token features (--feature_type patch_tokens at extraction), with no prefix",
    )
    clipcap.add_argument("--num_layers", type=int, help="transformer mapper depth (default 8)")
    clipcap.add_argument(
        "--normalize_prefix", action="store_true", default=None, help="L2-normalize image features before the mapper"
    )
    clipcap.add_argument(
        "--use_dino",
        action="store_true",
        default=None,
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
        "--gpt2", help="causal LM: transformers id (gpt2, gpt2-medium, distilgpt2) or local directory (default gpt2)"
    )
    ours.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate")
    ours.add_argument(
        "--warmup_steps",
        type=int,
        help="linear warmup steps, then linear decay to 0 (default 5000); under --scst a constant rate after them (default 0)",
    )
    ours.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (ClipCap: 0)")
    ours.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)"
    )
    ours.add_argument(
        "--val_data",
        default=None,
        help="validation features (.pkl or store directory): loss per caption token after each epoch, and "
        "{prefix}_best_loss.pt, the model of the lowest",
    )
    ours.add_argument(
        "--eval_every",
        type=int,
        default=0,
        help="every N epochs (and the last), greedy-decode --val_data, log CIDEr and BLEU-4, keep {prefix}_best.pt (0: off)",
    )
    ours.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help=PRECISION_HELP)
    ours.add_argument("--device", default="auto", help=DEVICE_HELP)
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
    ours.add_argument(
        "--export_hf",
        metavar="OUT_DIR",
        help="after training, export the final epoch's checkpoint to this directory as export.py does (checked at "
        "start: a new directory, or an earlier export with --overwrite)",
    )
    ours.add_argument(
        "--push_to_hub", metavar="REPO_ID", help="with --export_hf: then upload the export to this hub model repository"
    )
    scst = parser.add_argument_group("SCST: self-critical fine-tuning of a train.py checkpoint (Stage 2b)")
    scst.add_argument("--scst", action="store_true", help="fine-tune --init_from by SCST instead of cross-entropy")
    scst.add_argument(
        "--init_from",
        help="the train.py checkpoint (or export.py directory) to start from: its config decides the model",
    )
    scst.add_argument("--reward", choices=REWARDS, help="cider (CIDEr-D, default), clip (CLIP-S) or their sum")
    scst.add_argument(
        "--baseline", choices=BASELINES, help="mean of the image's other samples (default), or its greedy caption's"
    )
    scst.add_argument("--scst_samples", type=int, help="captions sampled per image (default 5)")
    scst.add_argument("--max_length", type=int, help="most tokens a sampled caption has (default 20)")
    scst.add_argument("--clip_model", help="CLIP name, id or directory with both towers (clip rewards)")
    scst.add_argument(
        "--clip_features",
        help="parse_coco_clip.py features of --clip_model over --data's images, when --data holds other features",
    )
    scst.add_argument("--clip_weight", type=float, help="weight of CLIP-S in --reward cider+clip (default 1.0)")
    add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    if args.scst and (model_flags := _given(args, MODEL_DEFAULTS)):
        parser.error(f"--scst takes the model from --init_from's config; do not give {model_flags}")
    if not args.scst and (scst_flags := _given(args, SCST_DEFAULTS)):
        parser.error(f"{scst_flags}: only with --scst")
    if args.mapping_type == "xattn" and (prefix_flags := _given(args, PREFIX_MAPPER_DEFAULTS)):
        parser.error(f"{prefix_flags}: --mapping_type xattn has no prefix mapper")
    for name, default in {**MODEL_DEFAULTS, **SCST_DEFAULTS}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.push_to_hub and not args.export_hf:
        parser.error("--push_to_hub uploads the --export_hf directory: give --export_hf too")
    if args.warmup_steps is None:
        args.warmup_steps = WARMUP_STEPS[args.scst]
    return args


def _given(args: argparse.Namespace, defaults: dict) -> str:
    """The flags of `defaults` given on the command line, as text ("" for none)."""
    return ", ".join(f"--{name}" for name in defaults if getattr(args, name) is not None)


def main(args: argparse.Namespace) -> ClipCaptionModel:
    """Train (cross-entropy, or SCST with --scst) and return the model (the checkpoints are in --out_dir)."""
    return run_training(TrainingOptions(**vars(args)), ScstTrainer if args.scst else Trainer)


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
