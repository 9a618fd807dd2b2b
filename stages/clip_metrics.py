"""evaluate.py --clip_score MODEL: CLIP-S and RefCLIP-S (Hessel et al. 2021) of the scored captions, overall
and per image, through the scorer SCST's CLIP reward uses (models/clip_score.py). Image embeddings come
from a parse_coco_clip.py file of MODEL (--clip_features, or --features when it is one), else the images
are encoded from --coco_images_dir, their files named by the references or by the feature file's meta."""

import argparse
from pathlib import Path

import torch

from data.annotations import image_files
from data.errors import InputError
from data.features import FeatureFile, read_feature_file
from data.references import ImageId, is_pickle
from models.clip_score import ClipScorer, holds_image_embeds_of
from models.device import resolve_device, resolve_precision
from models.encoders import load_encoder
from stages.extract import iter_encoded_batches

CLIP_SCORE_KEYS = ("CLIP-S", "RefCLIP-S")


def _from_feature_file(features: FeatureFile, name: str, image_ids: list[ImageId]) -> dict[ImageId, torch.Tensor]:
    rows = features.image_rows()
    missing = [image_id for image_id in image_ids if image_id not in rows]
    if missing:
        raise InputError(f"{name} lacks {len(missing)} scored image(s), e.g. {missing[0]!r}")
    return {image_id: features.embeddings[rows[image_id]] for image_id in image_ids}


def _image_paths(args: argparse.Namespace, features: FeatureFile | None) -> tuple[dict[ImageId, Path], str]:
    """Each image's file under --coco_images_dir: from the references' annotations, else the feature file's."""
    source, split = args.references, args.split
    if source is not None and is_pickle(Path(source)):
        features, source = read_feature_file(source), None
    if source is None and features is not None:
        source, split = features.meta.get("captions_file"), features.meta.get("split")
        if source is None or not Path(source).is_file():
            raise InputError(
                f"--clip_score: the feature file names no readable annotation file ({source}); give --clip_features"
            )
    return image_files(source, split, args.coco_images_dir), str(source)


def _encode_images(
    args: argparse.Namespace, scorer: ClipScorer, features: FeatureFile | None, image_ids: list[ImageId]
) -> dict[ImageId, torch.Tensor]:
    """MODEL's image_embeds of the scored images, encoded from their files; an unreadable one is an error."""
    paths, source = _image_paths(args, features)
    missing = [image_id for image_id in image_ids if image_id not in paths]
    if missing:
        raise InputError(f"--clip_score: {source} names no image file for image id {missing[0]!r}")
    encoder, preprocess = load_encoder(args.clip_score, family="clip")
    device = resolve_device(args.device)
    embeds: dict[ImageId, torch.Tensor] = {}
    ordered = [paths[image_id] for image_id in image_ids]
    batches = iter_encoded_batches(
        encoder,
        preprocess,
        ordered,
        batch_size=args.batch_size,
        num_workers=0,
        device=device,
        precision=resolve_precision(args.precision, device),
    )
    for batch in batches:
        if batch.failures:
            position, reason = batch.failures[0]
            raise InputError(f"--clip_score: cannot encode {ordered[position]}: {reason}")
        embeds.update((image_ids[position], row) for position, row in zip(batch.indices, batch.features))
    return embeds


def clip_image_embeds(
    args: argparse.Namespace, scorer: ClipScorer, features: FeatureFile | None, image_ids: list[ImageId]
) -> dict[ImageId, torch.Tensor]:
    """The image embeddings CLIP-S compares captions with, from the first source that has them."""
    if args.clip_features is not None:
        clip_file = read_feature_file(args.clip_features)
        if not holds_image_embeds_of(clip_file, scorer.name):
            encoder = clip_file.meta.get("encoder") or {}
            raise InputError(
                f"--clip_features {args.clip_features} holds features of {encoder.get('name', 'an unrecorded encoder')}, "
                f"not the image_embeds of --clip_score {args.clip_score}"
            )
        return _from_feature_file(clip_file, f"--clip_features {args.clip_features}", image_ids)
    if features is not None and holds_image_embeds_of(features, scorer.name):
        return _from_feature_file(features, f"--features {args.features}", image_ids)
    if args.coco_images_dir is None:
        raise InputError(
            f"--clip_score needs image embeddings of {args.clip_score}: give --clip_features (a parse_coco_clip.py "
            f"--clip_model_type {args.clip_score} file) or --coco_images_dir"
        )
    return _encode_images(args, scorer, features, image_ids)


def clip_scores(
    args: argparse.Namespace,
    predictions: dict[ImageId, str],
    references: dict[ImageId, list[str]],
    features: FeatureFile | None,
) -> tuple[dict[str, float], dict[ImageId, dict[str, float]]]:
    """(overall, per image) CLIP-S and RefCLIP-S of one caption per image against its image and references."""
    scorer = ClipScorer(args.clip_score, resolve_device(args.device), purpose="--clip_score")
    image_ids = list(references)
    embeds = clip_image_embeds(args, scorer, features, image_ids)
    clip_s, ref_clip_s = scorer.scores(
        torch.stack([embeds[image_id] for image_id in image_ids]),
        [predictions[image_id] for image_id in image_ids],
        [references[image_id] for image_id in image_ids],
    )
    per_image = {
        image_id: {"CLIP-S": float(clip), "RefCLIP-S": float(ref)}
        for image_id, clip, ref in zip(image_ids, clip_s.tolist(), ref_clip_s.tolist())
    }
    return {"CLIP-S": float(clip_s.mean()), "RefCLIP-S": float(ref_clip_s.mean())}, per_image
