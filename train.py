r"""Stage 2: train a mapper from image features to a GPT-2 prefix (ClipCap's train.py flags), or a
GPT-2 that cross-attends to patch tokens (--mapping_type xattn).

python train.py --data features_train.pkl --out_dir runs/coco --prefix coco_prefix
python train.py --data patch_tokens_train --mapping_type xattn --only_prefix --out_dir runs/xattn --prefix xattn
torchrun --nproc_per_node 4 train.py --data ... --bs 40          # DistributedDataParallel
torchrun --nproc_per_node 8 train.py --fsdp --lm Qwen/Qwen2.5-7B --data ... --bs 8   # FSDP2: a sharded LM
python train.py --scst --init_from runs/coco/coco_prefix_best.pt --data features_train.pkl \
    --out_dir runs/coco_scst --prefix coco_scst --reward cider --lr 1e-5 --bs 50   # SCST (Stage 2b)
python train.py --unpaired --init_from runs/text_only/text_prefix-009.pt --data features_train.pkl \
    --corpus corpus.pkl --clip_model ViT-B/32 --out_dir runs/unpaired --prefix unpaired   # CgT-GAN
"""

from data.errors import exit_on_input_error
from data.options import build_parser, parse_options
from models import quiet_transformers
from models.captioner import ClipCaptionModel
from stages.objectives import OBJECTIVES
from stages.train import run_training
from stages.train_options import GROUPS, USAGE_RULES, TrainingOptions


def parse_args(argv: list[str] | None = None) -> TrainingOptions:
    """train.py's flags (stages/train_options.py defines each one): ClipCap's names first, then this repo's."""
    parser = build_parser(TrainingOptions, __doc__, GROUPS)
    options = parse_options(TrainingOptions, parser, argv, USAGE_RULES)
    if options.push_to_hub and not options.export_hf:
        parser.error("--push_to_hub uploads the --export_hf directory: give --export_hf too")
    if options.warmup_steps is None:
        options.warmup_steps = OBJECTIVES[options.objective].default_warmup_steps
    if options.reward is None:
        options.reward = OBJECTIVES[options.objective].default_reward
    return options


def main(args: TrainingOptions) -> ClipCaptionModel:
    """Train (cross-entropy, SCST with --scst, unpaired with --unpaired) and return the model (the checkpoints are in --out_dir)."""
    return run_training(TrainingOptions(**vars(args)))


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
