r"""Convert features between the pickle (ClipCap's format) and the sharded store, the direction taken from IN:

    python convert_features.py features/coco_train.pkl features/coco_train          # pickle -> store
    python convert_features.py features/cc3m_clip features/cc3m_clip.pkl            # store -> pickle
"""

import argparse

from data.errors import InputError, exit_on_input_error
from data.store import FEATURE_DTYPES, SHARD_BYTES, convert_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """IN, OUT and the store's layout."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a feature pickle (converted to a store) or a store directory (to a pickle)")
    parser.add_argument("output", help="the store directory (new or empty) or the pickle file to write")
    parser.add_argument(
        "--feature_dtype",
        default=None,
        choices=tuple(FEATURE_DTYPES),
        help="pickle -> store: the shards' float type; fp16 halves the size (default: fp32, fp16 for token "
        "features such as patch_tokens)",
    )
    parser.add_argument(
        "--rows_per_shard",
        type=int,
        default=None,
        help=f"pickle -> store: images per shard (default: as many as fit in {SHARD_BYTES / 1024**3:g} GiB of embeddings)",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Convert IN to OUT and say which way."""
    if args.rows_per_shard is not None and args.rows_per_shard < 1:
        raise InputError(f"--rows_per_shard {args.rows_per_shard}: must be at least 1")
    direction = convert_features(args.input, args.output, args.feature_dtype, args.rows_per_shard)
    print(f"wrote {args.output} ({direction})")


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
