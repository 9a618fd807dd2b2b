"""Stage 3 behind predict.py: rebuild a captioner (our checkpoint, or an original ClipCap state dict
with its settings), encode images with the encoder it was trained on, and caption them."""

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from data.errors import InputError
from data.extraction import iter_encoded_batches
from data.features import FeatureFile
from models.captioner import ClipCaptionModel
from models.checkpoint import load_checkpoint, load_clipcap_weights
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, caption_features, sampling_generator
from models.encoders import ImageEncoder, Preprocess, encoder_from_spec, load_encoder


@dataclass
class ImageCaptions:
    """The captions of one input image (best first), or why it could not be read."""

    index: int  # position in the list of paths
    captions: list[str] | None
    error: str | None = None


def check_feature_width(feature_dim: int, model: ClipCaptionModel, source: str) -> None:
    """Features of the wrong width would fail deep inside the mapper; say so in one line instead."""
    expected = model.config.feature_dim
    if feature_dim != expected:
        raise InputError(f"{source} gives {feature_dim}-d features, the captioner's mapper expects {expected}-d")


def load_for_images(checkpoint: str | os.PathLike) -> tuple[ClipCaptionModel, ImageEncoder, Preprocess]:
    """A checkpoint's captioner and the encoder (with preprocessing) its config records."""
    model = load_checkpoint(checkpoint)
    if not model.config.encoder:
        raise InputError(f"{checkpoint}: the config records no image encoder; caption a feature file with --features")
    encoder, preprocess = encoder_from_spec(model.config.encoder)
    check_feature_width(encoder.spec.feature_dim, model, f"encoder {encoder.spec.name!r}")
    return model, encoder, preprocess


def load_clipcap_for_images(
    weights: str | os.PathLike, settings: CaptionerConfig, encoder_name: str
) -> tuple[ClipCaptionModel, ImageEncoder, Preprocess]:
    """An original ClipCap state dict with its settings; the feature width comes from its encoder."""
    if not os.path.isfile(weights):
        raise InputError(f"{weights}: weights file not found")
    encoder, preprocess = load_encoder(encoder_name)
    settings.feature_dim = encoder.spec.feature_dim
    settings.encoder = encoder.spec.to_dict()
    return load_clipcap_weights(weights, settings), encoder, preprocess


def caption_image_files(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerBase,
    encoder: ImageEncoder,
    preprocess: Preprocess,
    paths: Sequence[str | os.PathLike],
    options: DecodingOptions,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    progress: bool,
) -> Iterator[ImageCaptions]:
    """Caption image files batch by batch, in input order; an unreadable file yields its error."""
    batches = iter_encoded_batches(
        encoder,
        preprocess,
        paths,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        progress=progress,
    )
    generator = sampling_generator(options, device)  # one for all batches: each draws on from the last
    for batch in batches:
        results = [ImageCaptions(index, None, reason) for index, reason in batch.failures]
        if batch.indices:
            captions = caption_features(
                model,
                tokenizer,
                batch.features,
                options,
                batch_size=batch_size,
                device=device,
                precision=precision,
                generator=generator,
            )
            results += [ImageCaptions(index, texts) for index, texts in zip(batch.indices, captions)]
        yield from sorted(results, key=lambda result: result.index)


def caption_feature_file(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerBase,
    feature_file: FeatureFile,
    options: DecodingOptions,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: bool,
) -> list[tuple[object, list[str]]]:
    """Caption each image row of a feature file once: (image_id, captions) in row order."""
    rows = feature_file.image_rows()  # image id -> row
    features = feature_file.embeddings[list(rows.values())]  # (N, D)
    captions = caption_features(
        model,
        tokenizer,
        features,
        options,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=progress,
    )
    return list(zip(rows, captions))
