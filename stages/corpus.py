"""Stage 1 for text (behind parse_corpus.py): a sentence corpus into a feature file or store of CLIP text
embeddings, for text-only training (CapDec, DeCap) and DeCap's memory at inference.

Each unique sentence is embedded once by the CLIP text tower (the projected `text_embeds`, not normalized, as
image extraction keeps `image_embeds`) and is both a row and its one caption (image_id = the row). The meta
records `modality: "text"` and, as `encoder`, the spec an image extraction with the same CLIP records (or with
--image_encoder, with a train_clip.py encoder aligned to its frozen text tower): a
captioner trained on these rows captions that CLIP's image embeddings, and check_same_encoder matches them."""

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.atomic import check_outputs
from data.corpus import Corpus, describe_corpus, read_corpus
from data.errors import InputError
from data.features import FEATURES_KEY, TEXT_MODALITY, FeatureFile, write_feature_file
from data.store import FEATURE_DTYPES, check_store_output, clear_store, write_store
from models.aligned import aligned_text_space
from models.clip_score import ClipScorer, clip_name
from models.device import autocast, resolve_device, resolve_precision
from models.encoders import load_encoder
from stages.train_options import TrainingOptions

# The limit train.py drops captions at: a corpus sentence it would drop is not embedded.
MAX_CAPTION_CHARS = next(f.default for f in dataclasses.fields(TrainingOptions) if f.name == "max_caption_chars")


def image_spec_of_clip(clip_model_type: str, image_encoder: str | None = None) -> dict:
    """The encoder spec an image extraction records for the image side of this CLIP's text: its own image_embeds
    (parse_coco_clip.py), or with `image_encoder` that train_clip.py encoder's, refused unless it was aligned to
    this CLIP's frozen text tower."""
    if image_encoder is None:
        encoder, _ = load_encoder(clip_model_type, family="clip", feature_type="image_embeds")
        return encoder.spec.to_dict()
    encoder, _ = load_encoder(image_encoder, family="aligned")
    space, clip = aligned_text_space(image_encoder), clip_name(clip_model_type)
    if space != clip:
        raise InputError(
            f"--image_encoder {image_encoder}: aligned to {space or 'a trained or unrecorded text tower'}, not to the "
            f"frozen text tower of --clip_model_type {clip_model_type}"
        )
    return encoder.spec.to_dict()


class SentenceEmbedder:
    """The CLIP text tower over batches of sentences, with one progress bar for the whole corpus."""

    def __init__(self, scorer: ClipScorer, precision: str, total: int, batch_size: int):
        self.scorer, self.precision, self.batch_size = scorer, precision, batch_size
        self.bar = tqdm(total=total, unit="sentence", desc="embedding", dynamic_ncols=True)

    def embed(self, sentences: list[str]) -> torch.Tensor:
        """(n, D) float32 text embeddings, on the CPU."""
        rows = []
        for start in range(0, len(sentences), self.batch_size):
            batch = sentences[start : start + self.batch_size]
            with autocast(self.scorer.device, self.precision):
                rows.append(self.scorer.text_features(batch).float().cpu())
            self.bar.update(len(batch))
        return torch.cat(rows)


def _shard_rows(corpus: Corpus, embedder: SentenceEmbedder, feature_dtype: str):
    """write_store's rows, embedded as each shard is asked for: one shard in memory, whatever the corpus."""

    def shard_rows(start: int, stop: int) -> tuple[np.ndarray, list[tuple[Any, str, int]]]:
        sentences = corpus.sentences[start:stop]
        embeddings = embedder.embed(sentences).numpy().astype(FEATURE_DTYPES[feature_dtype])
        return embeddings, [(start + row, sentence, row) for row, sentence in enumerate(sentences)]

    return shard_rows


def _check_arguments(args: argparse.Namespace, output: Path) -> None:
    for flag in ("batch_size", "max_caption_chars"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.output_format == "shards":
        check_store_output(output)
        if output.resolve() in Path(args.corpus).resolve().parents:
            raise InputError(f"--output_file {output}: holds --corpus {args.corpus}; it would be replaced")
    else:
        if args.feature_dtype is not None:
            raise InputError("--feature_dtype is the store's float type: only with --output_format shards")
        check_outputs({"--output_file": output}, {"--corpus": args.corpus})


def run_corpus(args: argparse.Namespace) -> FeatureFile | None:
    """parse_corpus.py's run: read and clean the corpus, embed each unique sentence once, write, report."""
    output = Path(args.output_file)
    _check_arguments(args, output)
    corpus = read_corpus(
        args.corpus, max_chars=args.max_caption_chars, parquet_column=args.parquet_column, split=args.split
    )
    print(f"--corpus {args.corpus}: {describe_corpus(corpus)}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    # Also refuses a model that is not a CLIP, or an encoder of another space, before the towers load.
    spec = image_spec_of_clip(args.clip_model_type, args.image_encoder)
    scorer = ClipScorer(args.clip_model_type, device, args.batch_size, purpose="parse_corpus.py")
    embedder = SentenceEmbedder(scorer, precision, len(corpus.sentences), args.batch_size)
    count = len(corpus.sentences)
    meta = {
        "encoder": spec,
        "feature_type": spec["feature_type"],
        "modality": TEXT_MODALITY,
        "clip_model": scorer.name,
        "corpus": str(args.corpus),
        "corpus_format": corpus.format,
        "split": args.split,
        "precision": precision,
        "num_duplicates": corpus.duplicates,
        "num_skipped": sum(corpus.skipped.values()),
        "skipped": corpus.skipped,
    }
    with embedder.bar:
        if args.output_format == "shards":
            dtype = args.feature_dtype or "fp32"
            clear_store(output)
            write_store(output, meta, count, (spec["feature_dim"],), dtype, _shard_rows(corpus, embedder, dtype))
            features = None
        else:
            embeddings = embedder.embed(corpus.sentences)  # (N, D)
            captions = [
                {"image_id": row, "caption": text, FEATURES_KEY: row} for row, text in enumerate(corpus.sentences)
            ]
            counts = {"num_images": count, "num_captions": count, "feature_dim": embeddings.shape[1]}
            features = FeatureFile(embeddings, captions, {**meta, **counts, "row_shape": [embeddings.shape[1]]})
            write_feature_file(output, features)
    print(f"wrote {output}: {count} sentences x {spec['feature_dim']} features ({scorer.name})")
    return features
