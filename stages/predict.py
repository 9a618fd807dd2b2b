"""Stage 3 behind predict.py: rebuild a captioner (our checkpoint or export directory, or an original
ClipCap state dict with its settings), encode images with the encoder it was trained on, and caption them."""

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from data.annotations import image_id_from_path
from data.atomic import check_outputs
from data.errors import InputError
from data.features import IMAGE_MODALITY, TEXT_MODALITY, FeatureFile, check_same_encoder
from data.predictions import expand_image_inputs, write_coco_results
from data.sheet import draw_contact_sheet, sheet_format
from data.store import read_features
from models.captioner import ClipCaptionModel
from models.checkpoint import captioner_tokenizer, load_clipcap_weights
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, caption_features, decoding_options_from_args, sampling_generator
from models.device import resolve_device, resolve_precision
from models.encoders import ImageEncoder, Preprocess, encoder_from_spec, load_encoder
from models.hf_export import load_captioner
from models.text_memory import TextMemory, memory_temperature
from stages.extract import iter_encoded_batches

PROGRESS_FROM = 8  # images; fewer than this get no progress bar
CLIPCAP_STOP_TOKEN = "."  # ClipCap's captions carry no EOS: its models end them with a period


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


def check_features_fit(
    feature_file: FeatureFile, model: ClipCaptionModel, source: str, modality: str = IMAGE_MODALITY
) -> None:
    """A feature file's modality, width and (when both record it) encoder must be what the captioner reads here:
    images' features (a text-only captioner's too: its image side is the same CLIP), or a --text_memory corpus."""
    if feature_file.modality != modality:
        raise InputError(
            f"{source}: holds {feature_file.modality} features, not {modality} features"
            + ("; a corpus belongs in --text_memory" if feature_file.modality == TEXT_MODALITY else "")
        )
    check_feature_width(feature_file.feature_dim, model, source)
    check_same_encoder(feature_file, source, model.config.encoder, "the captioner")


def read_text_memory(path: str | None, model: ClipCaptionModel, temperature: float) -> TextMemory | None:
    """--text_memory: a corpus's text embeddings (parse_corpus.py) of the captioner's CLIP, or None without it."""
    if path is None:
        return None
    memory = read_features(path)
    source = f"--text_memory {path}"
    if memory.modality != TEXT_MODALITY:
        raise InputError(f"{source}: holds {memory.modality} features, not a corpus's text embeddings (parse_corpus.py)")
    if model.config.cross_attention:
        raise InputError(f"{source}: the captioner attends to patch tokens (xattn); the memory replaces one vector per image")
    check_features_fit(memory, model, source, TEXT_MODALITY)
    return TextMemory(memory.embeddings, temperature)


def load_for_images(checkpoint: str | os.PathLike) -> tuple[ClipCaptionModel, ImageEncoder, Preprocess]:
    """A checkpoint's (or export's) captioner and the encoder (with preprocessing) its config records."""
    model = load_captioner(checkpoint)
    if not model.config.encoder:
        raise InputError(f"{checkpoint}: the config records no image encoder; caption a feature file with --features")
    encoder, preprocess = encoder_from_spec(model.config.encoder, str(checkpoint))
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
    memory: TextMemory | None = None,
) -> Iterator[ImageCaptions]:
    """Caption image files batch by batch, in input order; an unreadable file yields its error. With `memory`,
    each image embedding is projected onto it first (DeCap)."""
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
                memory=memory,
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
    memory: TextMemory | None = None,
) -> list[tuple[object, list[str]]]:
    """Caption each image row of a feature file once: (image_id, captions) in row order (projected onto
    `memory` first, if given)."""
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
        memory=memory,
    )
    return list(zip(rows, captions))


def _check_args(args: argparse.Namespace) -> None:
    if (args.checkpoint is None) == (args.weights is None):
        raise InputError("give exactly one of --checkpoint (this repo) and --weights (an original ClipCap state dict)")
    if bool(args.images) == bool(args.features):
        raise InputError("give images (files, directories, globs) or --features FILE, not both and not neither")
    if args.sheet and args.features:
        raise InputError("--sheet draws images; it cannot be used with --features")
    if args.sheet:
        sheet_format(args.sheet)  # a bad extension fails now, not after every image is captioned
    if args.batch_size < 1 or args.num_workers < 0 or args.sheet_max < 1:
        raise InputError("--batch_size and --sheet_max must be at least 1, --num_workers at least 0")


def _clipcap_settings(args: argparse.Namespace, feature_dim: int = 0) -> CaptionerConfig:
    """The settings an original ClipCap state dict cannot tell by itself."""
    return CaptionerConfig(
        feature_dim=feature_dim,
        prefix_length=args.prefix_length,
        prefix_length_clip=args.prefix_length_clip,
        mapping_type=args.mapping_type,
        num_layers=args.num_layers,
        normalize_prefix=args.normalize_prefix,
        lm_name=args.lm,
    )


def predict_features(
    args: argparse.Namespace, options: DecodingOptions, device: torch.device, precision: str
) -> list[tuple[object, list[str]]]:
    """Caption every image row of a feature file, printing `image_id<TAB>caption` lines."""
    feature_file = read_features(args.features)
    if args.weights:
        model = load_clipcap_weights(args.weights, _clipcap_settings(args, feature_file.feature_dim))
    else:
        model = load_captioner(args.checkpoint)
    check_features_fit(feature_file, model, args.features)
    memory = read_text_memory(args.text_memory, model, memory_temperature(args))
    tokenizer = captioner_tokenizer(model)
    results = caption_feature_file(
        model.to(device),
        tokenizer,
        feature_file,
        options,
        batch_size=args.batch_size,
        device=device,
        precision=precision,
        progress=feature_file.embeddings.shape[0] >= PROGRESS_FROM,
        memory=memory,
    )
    for image_id, captions in results:
        for caption in captions:
            print(f"{image_id}\t{caption}")
    return results


def predict_images(
    args: argparse.Namespace, paths: list[Path], options: DecodingOptions, device: torch.device, precision: str
) -> tuple[list[tuple[Path, list[str]]], int]:
    """Caption image files, printing `path<TAB>caption` lines and an error line for each unreadable
    one; returns (path, captions) of those read and the number that could not be."""
    if args.weights:
        model, encoder, preprocess = load_clipcap_for_images(
            args.weights, _clipcap_settings(args), args.clip_model_type
        )
    else:
        model, encoder, preprocess = load_for_images(args.checkpoint)
    memory = read_text_memory(args.text_memory, model, memory_temperature(args))
    tokenizer = captioner_tokenizer(model)
    model.to(device)
    captioned, failed = [], 0
    results = caption_image_files(
        model,
        tokenizer,
        encoder,
        preprocess,
        paths,
        options,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        precision=precision,
        progress=len(paths) >= PROGRESS_FROM,
        memory=memory,
    )
    for result in results:
        path = paths[result.index]
        if result.captions is None:
            tqdm.write(f"error: {path}: {result.error}", file=sys.stderr)  # keeps the progress bar intact
            failed += 1
            continue
        captioned.append((path, result.captions))
        for text in result.captions:
            print(f"{path}\t{text}")
    return captioned, failed


def run_prediction(args: argparse.Namespace) -> None:
    """predict.py's run: load the model, caption images or a feature file, write what was asked."""
    _check_args(args)
    paths = expand_image_inputs(args.images) if args.images else []
    check_outputs(
        {"--output": args.output, "--sheet": args.sheet},
        {
            "--checkpoint": args.checkpoint,
            "--weights": args.weights,
            "--features": args.features,
            "--text_memory": args.text_memory,
            "input": paths,
        },
    )
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    options = decoding_options_from_args(args)
    if args.weights and options.stop_token is None:
        options.stop_token = CLIPCAP_STOP_TOKEN
    source = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"--weights {args.weights} ({args.mapping_type})"
    inputs = f"--features {args.features}" if args.features else f"{len(args.images)} input(s)"
    print(
        f"predict: {source}, {inputs}, device {device}, precision {precision}, batch {args.batch_size}", file=sys.stderr
    )
    print(f"decoding: {options}", file=sys.stderr)

    if args.features:
        results, failed = predict_features(args, options, device, precision), 0
    else:
        captioned, failed = predict_images(args, paths, options, device, precision)
        results = [(image_id_from_path(path), captions) for path, captions in captioned]
        if args.sheet and captioned:
            drawn = captioned[: args.sheet_max]
            draw_contact_sheet([path for path, _ in drawn], [captions[0] for _, captions in drawn], args.sheet)
            print(f"contact sheet: {args.sheet} ({len(drawn)} of {len(captioned)} images)", file=sys.stderr)
    if args.output:
        write_coco_results(args.output, [(image_id, captions[0]) for image_id, captions in results])
        print(f"wrote {len(results)} captions to {args.output}", file=sys.stderr)
    if failed:
        raise InputError(f"{failed} of {failed + len(results)} images could not be read (see the lines above)")
