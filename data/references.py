"""Captions to score and the references to score them against: a COCO results file of
predictions; references from a COCO captions file, a Karpathy dataset_*.json split, a ClipCap list
or a feature file; and the checks that pair them image by image."""

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data.annotations import read_annotations
from data.errors import InputError, read_json_input
from data.features import FeatureFile
from data.store import is_store, read_features

ImageId = Any  # an int for COCO images, else whatever id the annotation file gives (a string)
PICKLE_SUFFIXES = (".pkl", ".pickle")


def _examples(ids: Iterable[ImageId], limit: int = 5) -> str:
    ids = list(ids)
    shown = ", ".join(repr(image_id) for image_id in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def read_predictions(path: str | os.PathLike) -> dict[ImageId, str]:
    """A COCO results file `[{"image_id", "caption"}, ...]` -> {image_id: caption}, one caption per image."""
    entries = read_json_input(path, "predictions file")
    if not isinstance(entries, list) or not entries:
        raise InputError(f'{path}: expected a non-empty COCO results list [{{"image_id": ..., "caption": ...}}, ...]')
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise InputError(f"{path}: entry {number} needs an 'image_id' and a string 'caption'")
    counts = Counter(entry["image_id"] for entry in entries)
    duplicates = [image_id for image_id, count in counts.items() if count > 1]
    if duplicates:
        raise InputError(
            f"{path}: {len(duplicates)} image id(s) have more than one caption: {_examples(duplicates)} "
            "(the COCO metrics score one caption per image)"
        )
    return {entry["image_id"]: entry["caption"] for entry in entries}


def describe_empty_captions(predictions: dict[ImageId, str], source: str) -> str | None:
    """A warning naming the captions with no word in them (the PTB tokenizer leaves nothing of "" or
    "."): they are scored, as zero, but a reader should know. None when there are none."""
    empty = [image_id for image_id, caption in predictions.items() if not any(c.isalnum() for c in caption)]
    if not empty:
        return None
    return f"warning: {len(empty)} caption(s) in {source} have no word and score 0: image id(s) {_examples(empty)}"


def references_from_features(feature_file: FeatureFile) -> dict[ImageId, list[str]]:
    """Every caption of every image in a feature file, grouped by image id in row order."""
    references: dict[ImageId, list[str]] = {}
    for caption in feature_file.captions:
        references.setdefault(caption["image_id"], []).append(caption["caption"])
    return references


def is_pickle(path: Path) -> bool:
    """Whether a references file is a feature pickle (by suffix, else its first byte)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"  # the PROTO opcode every pickle since protocol 2 starts with


def load_references(path: str | os.PathLike, split: str | None = None) -> dict[ImageId, list[str]]:
    """{image_id: reference captions} from a COCO captions file, a Karpathy json (needs `split`),
    a ClipCap caption list or a feature file; empty reference captions are refused."""
    path = Path(path)
    if not path.is_file() and not is_store(path):
        raise InputError(f"{path}: no such references file")
    if is_store(path) or is_pickle(path):
        feature_file = read_features(path)
        file_split = feature_file.meta.get("split")
        if split is not None and file_split is not None and split != file_split:
            raise InputError(f"{path}: --split {split} given, but this feature file holds split {file_split!r}")
        references = references_from_features(feature_file)
    else:
        references = {record.image_id: list(record.captions) for record in read_annotations(path, split)}
    empty = [image_id for image_id, captions in references.items() if not all(caption.strip() for caption in captions)]
    if empty:
        raise InputError(f"{path}: {len(empty)} image(s) have an empty reference caption: {_examples(empty)}")
    if not references:
        raise InputError(f"{path}: no reference captions" + (f" in split {split!r}" if split else ""))
    return references


def check_matching_ids(
    predictions: dict[ImageId, Any],
    references: dict[ImageId, list[str]],
    *,
    allow_missing: bool,
    predictions_name: str = "predictions",
    references_name: str = "references",
) -> dict[ImageId, list[str]]:
    """The references of the predicted images. Predictions without references are an error, and so
    are images without a prediction unless `allow_missing`."""
    unreferenced = [image_id for image_id in predictions if image_id not in references]
    if unreferenced:
        hint = ""
        if {str(image_id) for image_id in unreferenced} & {str(image_id) for image_id in references}:
            hint = " (some ids differ only in type, e.g. 42 and '42')"
        raise InputError(
            f"{len(unreferenced)} of {len(predictions)} image id(s) in {predictions_name} have no references in "
            f"{references_name}: {_examples(unreferenced)}{hint}"
        )
    missing = [image_id for image_id in references if image_id not in predictions]
    if missing and not allow_missing:
        raise InputError(
            f"{len(missing)} of {len(references)} image(s) in {references_name} have no prediction in "
            f"{predictions_name}: {_examples(missing)} (--allow_missing scores only the predicted images)"
        )
    return {image_id: captions for image_id, captions in references.items() if image_id in predictions}
