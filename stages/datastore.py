"""build_datastore.py's stage: captions (an annotation file, a corpus, or a feature file's) into a caption
datastore (data/datastore.py), each unique caption embedded once by a CLIP text tower and L2-normalized."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from data.annotations import read_annotations
from data.atomic import check_output_directory
from data.captions import caption_texts
from data.corpus import Corpus, clean_sentences, describe_corpus, read_corpus
from data.datastore import INDEX_TYPES, META_FILE, IndexParams, check_index_params, read_datastore, write_datastore
from data.errors import InputError
from data.options import UsageRule, option
from data.store import read_features
from models.clip_score import ClipScorer
from models.device import DEVICE_HELP, PRECISION_HELP, PRECISIONS, resolve_device, resolve_precision
from models.encoders import CLIP_MODELS
from stages.corpus import MAX_CAPTION_CHARS, SentenceEmbedder, image_spec_of_clip

GROUPS = {"input": "captions (one of --captions_file, --corpus, --features)", "index": "index", "running": "running"}
SOURCES = ("captions_file", "corpus", "features")
IVFPQ = ("ivfpq",)  # the usage rule of the ivfpq-only flags
RULES = (UsageRule("ivfpq", lambda options: options.index_type != "ivfpq", "{flags}: only with --index_type ivfpq"),)


@dataclass(kw_only=True)
class DatastoreOptions:
    """build_datastore.py's flags."""

    captions_file: str | None = option(
        None, "annotations: a ClipCap caption list, COCO captions or a Karpathy dataset_*.json", group="input"
    )
    split: str | None = option(None, "Karpathy files only: train, val, test, restval or train+restval", group="input")
    corpus: str | None = option(
        None, "sentences in any of parse_corpus.py's formats (text, JSON list, annotations, parquet)", group="input"
    )
    parquet_column: str | None = option(None, "--corpus parquet only: the column holding the sentences", group="input")
    features: str | None = option(None, "a feature file or store: its captions", group="input")
    max_caption_chars: int = option(
        MAX_CAPTION_CHARS, "captions longer than this are skipped and counted, as train.py drops them", minimum=1,
        group="input",
    )  # fmt: skip
    clip_model_type: str = option(
        "ViT-B/32",
        f"a whole CLIP: {', '.join(CLIP_MODELS)}, or a transformers id or local directory; must be the CLIP of the "
        "image features the datastore will serve",
    )
    output_dir: str = option(help="the datastore directory (index.faiss, captions.parquet, meta.json)")
    overwrite: bool = option(False, "replace an earlier datastore in --output_dir")
    index_type: str = option("flat", "flat: exact inner product; ivfpq: compressed, for millions of captions",
                             choices=INDEX_TYPES, group="index")  # fmt: skip
    nlist: int = option(1024, "ivfpq: inverted lists (coarse centroids)", minimum=1, group="index", usage=IVFPQ)
    pq_m: int = option(
        16, "ivfpq: product-quantizer sub-vectors (divides the embedding width)", minimum=1, group="index", usage=IVFPQ
    )
    nprobe: int = option(
        32, "ivfpq: lists searched per query (recorded; more is slower, closer to exact)", minimum=1, group="index",
        usage=IVFPQ,
    )  # fmt: skip
    train_sample: int = option(
        100_000, "ivfpq: captions the index is trained on (a seeded random sample)", minimum=1, group="index",
        usage=IVFPQ,
    )  # fmt: skip
    seed: int = option(0, "ivfpq: the training sample and k-means", group="index", usage=IVFPQ)
    batch_size: int = option(256, "captions per text-tower pass", minimum=1, group="running")
    device: str = option("auto", DEVICE_HELP, group="running")
    precision: str = option("auto", PRECISION_HELP, choices=("auto", *PRECISIONS), group="running")

    def index_params(self) -> IndexParams:
        """The index's build parameters."""
        return IndexParams(self.index_type, self.nlist, self.pq_m, self.train_sample, self.nprobe, self.seed)


def read_captions(options: DatastoreOptions) -> tuple[Corpus, str]:
    """The unique captions of the one given source, and that source named as its flag."""
    given = [name for name in SOURCES if getattr(options, name)]
    if len(given) != 1:
        raise InputError(f"give exactly one of --captions_file, --corpus, --features (given: {len(given)})")
    source = given[0]
    path = getattr(options, source)
    where = f"--{source} {path}"
    if options.parquet_column and source != "corpus":
        raise InputError(f"--parquet_column: only with --corpus (not {where})")
    if options.split and source == "features":
        raise InputError(f"--split {options.split}: a feature file holds one split already ({where})")
    if source == "corpus":
        corpus = read_corpus(
            path, max_chars=options.max_caption_chars, parquet_column=options.parquet_column, split=options.split
        )
    elif source == "captions_file":
        records = read_annotations(path, options.split)
        raw = [caption for record in records for caption in record.captions]
        corpus = clean_sentences(raw, "annotations", options.max_caption_chars, where)
    else:
        texts = caption_texts(read_features(path).captions)
        corpus = clean_sentences(texts, "features", options.max_caption_chars, where)
    return corpus, where


def run_build(options: DatastoreOptions) -> dict:
    """build_datastore.py's run: read, embed once per unique caption, normalize, index, write; returns meta.json."""
    output = Path(options.output_dir)
    inputs = {f"--{name}": getattr(options, name) for name in SOURCES}
    check_output_directory("--output_dir", output, inputs, options.overwrite)
    if output.is_dir() and any(output.iterdir()) and not (output / META_FILE).is_file():
        raise InputError(f"--output_dir {output}: exists and is not a datastore; --overwrite replaces only one")
    corpus, where = read_captions(options)
    print(f"{where}: {describe_corpus(corpus)}")
    spec = image_spec_of_clip(options.clip_model_type)  # refuses a model that is not a CLIP before the towers load
    params = options.index_params()
    check_index_params(params, len(corpus.sentences), spec["feature_dim"])
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    scorer = ClipScorer(options.clip_model_type, device, options.batch_size, purpose="build_datastore.py")
    embedder = SentenceEmbedder(scorer, precision, len(corpus.sentences), options.batch_size)
    with embedder.bar:
        embeddings = F.normalize(embedder.embed(corpus.sentences), dim=-1).numpy().astype(np.float32)  # (N, D)
    meta = {
        "encoder": spec,
        "clip_model": scorer.name,
        "source": where,
        "source_format": corpus.format,
        "split": options.split,
        "precision": precision,
        "num_duplicates": corpus.duplicates,
        "skipped": corpus.skipped,
    }
    written = write_datastore(output, embeddings, corpus.sentences, params, meta)
    read_datastore(output)  # what was written opens (checksums, count) before this run says so
    size = sum(os.path.getsize(path) for path in output.iterdir())
    print(f"wrote {output}: {written['count']} captions, {options.index_type} index, {size / 1024**2:.1f} MiB")
    return written
