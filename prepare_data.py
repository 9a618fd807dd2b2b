"""Download, verify and lay out a captioning data set for parse_coco_clip.py, then print the commands to run next.

    python prepare_data.py coco --root data                      # COCO 2014 images + Karpathy split (about 20 GB)
    python prepare_data.py flickr8k --root data                  # Flickr8k from its public mirror
    python prepare_data.py flickr30k --root data --flickr30k_zip flickr30k-images.zip   # a zip you downloaded

Downloads go to ROOT/downloads (an interrupted one continues when the command is run again); the layout
to ROOT/<dataset>. See docs/prepare_data.md.
"""

import argparse

from data.errors import exit_on_input_error
from stages.prepare import DATASETS, run_prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """prepare_data.py's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS), help="the data set to prepare")
    parser.add_argument("--root", required=True, help="the folder that receives downloads/ and <dataset>/")
    parser.add_argument(
        "--mirror", metavar="URL", help="fetch every file from URL/<file name> instead of its public host"
    )
    parser.add_argument(
        "--flickr30k_zip", metavar="PATH", help="flickr30k: the image zip you downloaded through the request form"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing extracted tree or Karpathy file (else refused)"
    )
    # The tests' door: their small fixture zips have other sizes and checksums than the real files.
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> list[str]:
    """Prepare the data set as the flags say (see stages/prepare.py); returns the extraction commands printed."""
    return run_prepare(args)


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
