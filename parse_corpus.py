r"""Stage 1 for text: embed a sentence corpus with a CLIP text tower into a feature file (or store) for
text-only training (CapDec) and DeCap's memory (predict.py / evaluate.py --text_memory).

    python parse_corpus.py --corpus data/coco/dataset_coco.json --split train+restval \
        --clip_model_type ViT-B/32 --output_file data/coco/clip_text_train.pkl
    python parse_corpus.py --corpus sentences.txt --output_format shards --output_file data/cc3m_text
"""

import argparse

from data.errors import exit_on_input_error
from data.store import FEATURE_DTYPES
from models import quiet_transformers
from models.device import DEVICE_HELP, PRECISION_HELP
from models.encoders import CLIP_MODELS
from stages.corpus import MAX_CAPTION_CHARS, run_corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The corpus, the CLIP, and the output (a pickle, or a store as extraction writes one)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus",
        required=True,
        help="sentences: a text file (one a line), a JSON list of strings, a ClipCap / COCO / Karpathy captions "
        "file (its captions), or a parquet file (with --parquet_column); detected from the extension, else the content",
    )
    parser.add_argument("--parquet_column", help="the parquet column holding the sentences")
    parser.add_argument("--split", help="Karpathy files only: train, val, test, restval or train+restval")
    parser.add_argument(
        "--clip_model_type",
        default="ViT-B/32",
        help=f"a whole CLIP (both towers): {', '.join(CLIP_MODELS)}, or a transformers id or local directory "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--image_encoder",
        help="the image side the corpus stands in for: a train_clip.py encoder directory aligned to --clip_model_type's "
        "frozen text tower (default: --clip_model_type's own vision tower); the meta records its spec, so a captioner "
        "trained on the corpus captions that encoder's features",
    )
    parser.add_argument("--output_file", required=True, help="the feature pickle, or the store directory (shards)")
    parser.add_argument(
        "--output_format",
        default="pickle",
        choices=("pickle", "shards"),
        help="pickle: one file, read whole; shards: a feature store, written shard by shard and memory-mapped when "
        "read (for corpora of millions of sentences) (default: %(default)s)",
    )
    parser.add_argument("--feature_dtype", choices=tuple(FEATURE_DTYPES), help="the store's float type (default: fp32)")
    parser.add_argument(
        "--max_caption_chars",
        type=int,
        default=MAX_CAPTION_CHARS,
        help="sentences longer than this are skipped and counted, as train.py drops them (default: %(default)s)",
    )
    parser.add_argument(
        "--batch_size", type=int, default=256, help="sentences per text-tower pass (default: %(default)s)"
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help=PRECISION_HELP)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Embed the corpus's unique sentences, one row and one caption each."""
    run_corpus(args)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
