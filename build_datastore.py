r"""Retrieval's datastore (SmallCap): captions embedded once by a CLIP text tower, L2-normalized, in a faiss index,
for retrieving each image's nearest captions by cosine (data/retrieval.py; docs/retrieval.md).

    python build_datastore.py --captions_file data/coco/dataset_coco.json --split train+restval \
        --clip_model_type ViT-B/32 --output_dir data/coco/datastore
    python build_datastore.py --corpus cc3m_captions.parquet --parquet_column caption \
        --index_type ivfpq --nlist 4096 --pq_m 32 --output_dir data/cc3m_datastore
    python build_datastore.py --features data/coco/clip_train.pkl --output_dir data/coco/datastore
"""

from data.errors import exit_on_input_error
from data.options import build_parser, check_ranges, parse_options
from models import quiet_transformers
from stages.datastore import GROUPS, RULES, DatastoreOptions, run_build


def parse_args(argv: list[str] | None = None) -> DatastoreOptions:
    """build_datastore.py's flags (stages/datastore.py defines each one)."""
    return parse_options(DatastoreOptions, build_parser(DatastoreOptions, __doc__, GROUPS), argv, RULES)


def main(args: DatastoreOptions) -> dict:
    """Build the datastore; returns its meta.json."""
    check_ranges(args)
    return run_build(args)


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
