"""The end of a folder extraction (Stage 1), on rank 0: the partial results of every process become the
feature file, a pickle built whole in memory or a store written shard by shard, each shard's rows gathered
from the memory-mapped chunk files as it is written; and the skipped-images report beside it."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.annotations import ImageRecord
from data.atomic import write_json_atomic
from data.errors import InputError
from data.features import FEATURES_KEY, FeatureFile, write_feature_file
from data.store import FEATURE_DTYPES, clear_store, default_feature_dtype, read_store, write_store
from stages.extract_resume import PartialStore, SavedResults


@dataclass
class ExtractionResult:
    """What rank 0 wrote: the feature file's contents and the images it had to skip."""

    features: FeatureFile  # a store's opened from disk, memory-mapped
    skipped: list[dict]  # {"image_id", "path", "reason"}, in annotation order
    skipped_file: Path


def skipped_path(output_file: str | os.PathLike) -> Path:
    """`features.pkl` -> `features.skipped.json`, beside it."""
    return Path(output_file).with_suffix(".skipped.json")


def _feature_file(records: list[ImageRecord], kept: list[int], saved: SavedResults, meta: dict) -> FeatureFile:
    """The pickle's contents, whole in memory: rows in annotation order, every caption of a kept image at its row."""
    embeddings = torch.from_numpy(saved.gather(kept))  # (N, D) or (N, T, D)
    captions = [
        {"image_id": records[index].image_id, "caption": caption, FEATURES_KEY: row}
        for row, index in enumerate(kept)
        for caption in records[index].captions
    ]
    counts = {"num_images": len(kept), "num_captions": len(captions)}
    shape = {"feature_dim": embeddings.shape[-1], "row_shape": list(embeddings.shape[1:])}
    return FeatureFile(embeddings, captions, {**meta, **counts, **shape})


def _write_store(
    directory: str | os.PathLike,
    records: list[ImageRecord],
    kept: list[int],
    saved: SavedResults,
    meta: dict,
    feature_dtype: str,
) -> FeatureFile:
    """The store, shard by shard, each shard's rows gathered from the chunk files as it is written; returns
    it opened (memory-mapped)."""

    def shard_rows(start: int, stop: int) -> tuple[np.ndarray, list[tuple[Any, str, int]]]:
        indices = kept[start:stop]
        captions = [
            (records[index].image_id, caption, row)
            for row, index in enumerate(indices)
            for caption in records[index].captions
        ]
        return saved.gather(indices, FEATURE_DTYPES[feature_dtype]), captions

    clear_store(directory)
    write_store(directory, meta, len(kept), saved.row_shape, feature_dtype, shard_rows)
    return read_store(directory)


def merge_partial_results(
    records: list[ImageRecord],
    paths: list[Path],
    store: PartialStore,
    output_file: str | os.PathLike,
    meta: dict,
    output_format: str,
    feature_dtype: str | None,
) -> ExtractionResult:
    """Rank 0: the partial store's results become the feature file (pickle or store) and the skipped-images
    report; the partial store goes."""
    saved = store.saved()
    missing = [index for index in range(len(records)) if index not in saved.rows and index not in saved.failed]
    if missing:  # only if chunk files vanished while the run was going: refuse to write a file with holes
        raise RuntimeError(f"{len(missing)} images have no result in {store.directory}, e.g. {paths[missing[0]]}")
    skipped = [
        {"image_id": records[index].image_id, "path": str(paths[index]), "reason": saved.failed[index]}
        for index in sorted(saved.failed)
    ]
    report = skipped_path(output_file)
    write_json_atomic(report, {"output_file": str(output_file), "num_skipped": len(skipped), "skipped": skipped})
    kept = [index for index in range(len(records)) if index in saved.rows]  # annotation order
    if not kept:
        store.remove()
        raise InputError(f"no image could be encoded ({len(skipped)} skipped, listed in {report})")
    meta = {**meta, "num_skipped": len(skipped)}
    if output_format == "shards":
        dtype = feature_dtype or default_feature_dtype(saved.row_shape)
        features = _write_store(output_file, records, kept, saved, meta, dtype)
    else:
        features = _feature_file(records, kept, saved, meta)
        write_feature_file(output_file, features)
    store.remove()
    return ExtractionResult(features, skipped, report)
