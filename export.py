"""Export a train.py checkpoint as a Hugging Face-format directory: config.json, model.safetensors (mapper and
whole LM), the tokenizer, preprocessor_config.json, a model card, and a local image encoder bundled under
encoder/. predict.py and evaluate.py take the directory as --checkpoint, on any machine.

python export.py runs/coco/coco_prefix_best.pt exports/coco_mlp
python export.py runs/coco/coco_prefix_best.pt exports/coco_mlp --overwrite --push_to_hub me/clipcap-coco
"""

import argparse

from data.errors import exit_on_input_error
from models import quiet_transformers
from models.captioner import ClipCaptionModel
from stages.export import run_export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """export.py's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file written by train.py (.pt)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the export directory to write (written whole, by rename)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it holds an earlier export (nothing else is replaced)",
    )
    parser.add_argument(
        "--push_to_hub",
        metavar="REPO_ID",
        help="then upload OUT_DIR to this hub model repository (created if missing; needs `hf auth login` or HF_TOKEN)",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> ClipCaptionModel:
    """Export (and push) as the flags say (see stages/export.py); returns the model exported."""
    return run_export(args)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
