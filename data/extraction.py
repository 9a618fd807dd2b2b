"""Image files to a feature file: each unique image decoded once (in DataLoader workers) and
encoded once, in batches, whatever the number of its captions.

`iter_encoded_batches` is the one code path from image files to features (predict.py uses it too);
`extract_features` adds the bookkeeping of Stage 1: rows aligned with captions, skipped images,
partial saves for `--resume`, and the merge of torchrun processes' shares.
"""

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.annotations import ImageRecord
from data.atomic import write_json_atomic
from data.errors import InputError
from data.extraction_resume import Chunk, PartialStore, fingerprint
from data.features import FEATURES_KEY, FeatureFile, write_feature_file
from data.images import ImageDataset, collate_images
from models.encoders import ImageEncoder, Preprocess
from models.runtime import DistributedContext, autocast


@dataclass
class EncodedBatch:
    """Features of the images of one batch that decoded, and the reasons of those that did not."""

    indices: list[int]  # positions in the `paths` given, one per feature row
    features: torch.Tensor  # (b, D) float32 on the CPU
    failures: list[tuple[int, str]]  # (position, reason)


def iter_encoded_batches(
    encoder: ImageEncoder,
    preprocess: Preprocess,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    progress: bool = True,
) -> Iterator[EncodedBatch]:
    """Decode `paths` in `num_workers` processes and encode them on `device` (the encoder moves there)."""
    loader = DataLoader(
        ImageDataset([Path(path) for path in paths], preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    encoder.to(device).eval()
    feature_dim = encoder.spec.feature_dim
    bar = tqdm(total=len(paths), unit="img", desc="encoding", disable=not progress, dynamic_ncols=True)
    skipped = 0
    with bar, torch.inference_mode():
        for indices, pixels, failures in loader:
            if pixels is None:
                features = torch.empty(0, feature_dim)
            else:
                with autocast(device, precision):
                    features = encoder(pixels.to(device, non_blocking=True))  # (b, D)
                features = features.float().cpu()
            skipped += len(failures)
            bar.update(len(indices) + len(failures))
            if failures:
                bar.set_postfix(skipped=skipped)
            yield EncodedBatch(indices, features, failures)


@dataclass
class ExtractionResult:
    """What rank 0 wrote: the feature file's contents and the images it had to skip."""

    features: FeatureFile
    skipped: list[dict]  # {"image_id", "path", "reason"}, in annotation order
    skipped_file: Path


def skipped_path(output_file: str | os.PathLike) -> Path:
    """`features.pkl` -> `features.skipped.json`, beside it."""
    return Path(output_file).with_suffix(".skipped.json")


def _build_feature_file(records: list[ImageRecord], encoded: dict[int, torch.Tensor], meta: dict) -> FeatureFile | None:
    """Rows in annotation order for the encoded images; every caption of a kept image points at its row."""
    kept = [index for index in range(len(records)) if index in encoded]
    if not kept:
        return None
    embeddings = torch.stack([encoded[index] for index in kept])  # (N, D)
    captions = [
        {"image_id": records[index].image_id, "caption": caption, FEATURES_KEY: row}
        for row, index in enumerate(kept)
        for caption in records[index].captions
    ]
    meta = {**meta, "num_images": len(kept), "num_captions": len(captions), "feature_dim": embeddings.shape[1]}
    return FeatureFile(embeddings, captions, meta)


def extract_features(
    records: list[ImageRecord],
    images_dir: str | os.PathLike,
    encoder: ImageEncoder,
    preprocess: Preprocess,
    output_file: str | os.PathLike,
    *,
    captions_file: str | os.PathLike,
    split: str | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    context: DistributedContext | None = None,
    resume: bool = False,
    checkpoint_every: int = 2000,
) -> ExtractionResult | None:
    """Encode every record's image into `output_file` (rank 0 writes; other ranks return None).

    Each process encodes the images i with i % world_size == rank; results go to the partial store
    every `checkpoint_every` images, and rank 0 merges the store into the feature file. With `resume`,
    images already in the store (encoded or skipped) are not read again."""
    context = context or DistributedContext()
    images_dir = Path(images_dir)
    paths = [images_dir / record.file_path for record in records]
    spec = encoder.spec.to_dict()
    file_paths = [record.file_path for record in records]
    settings = fingerprint(spec, precision, str(captions_file), split, str(images_dir), file_paths)
    store = PartialStore(output_file, settings)
    if resume:
        store.check()
    if context.is_main:
        store.start(fresh=not resume)
    if context.enabled:
        dist.barrier()  # nobody reads the store before rank 0 has set it up

    done: set[int] = set()
    if resume:
        encoded, failed = store.load()
        done = set(encoded) | set(failed)
    todo = [index for index in range(context.rank, len(records), context.world_size) if index not in done]
    if context.is_main and done:
        print(f"resuming: {len(done)} images done before, {len(todo)} left for this process")

    chunk = Chunk()
    batches = iter_encoded_batches(
        encoder,
        preprocess,
        [paths[index] for index in todo],
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        progress=context.is_main,
    )
    for batch in batches:  # batch positions index `todo`
        failures = [(todo[position], reason) for position, reason in batch.failures]
        chunk.add([todo[position] for position in batch.indices], batch.features, failures)
        if chunk.size >= checkpoint_every:
            store.save(chunk)
            chunk = Chunk()
    if chunk.size:
        store.save(chunk)
    if context.enabled:
        dist.barrier()  # every share is on disk
    if not context.is_main:
        return None
    meta = {
        "encoder": spec,
        "feature_type": spec["feature_type"],
        "image_size": spec["crop_dim"],
        "precision": precision,
        "split": split,
        "captions_file": str(captions_file),
        "images_dir": str(images_dir),
    }
    return _merge(records, paths, store, output_file, meta)


def _merge(
    records: list[ImageRecord], paths: list[Path], store: PartialStore, output_file: str | os.PathLike, meta: dict
) -> ExtractionResult:
    """Rank 0: the store's results become the feature file and the skipped-images report."""
    encoded, failed = store.load()
    missing = [index for index in range(len(records)) if index not in encoded and index not in failed]
    if missing:  # only if chunk files vanished while the run was going: refuse to write a file with holes
        raise RuntimeError(f"{len(missing)} images have no result in {store.directory}, e.g. {paths[missing[0]]}")
    skipped = [
        {"image_id": records[index].image_id, "path": str(paths[index]), "reason": failed[index]}
        for index in sorted(failed)
    ]
    features = _build_feature_file(records, encoded, {**meta, "num_skipped": len(skipped)})
    report = skipped_path(output_file)
    write_json_atomic(report, {"output_file": str(output_file), "num_skipped": len(skipped), "skipped": skipped})
    if features is None:
        store.remove()
        raise InputError(f"no image could be encoded ({len(skipped)} skipped, listed in {report})")
    write_feature_file(output_file, features)
    store.remove()
    return ExtractionResult(features, skipped, report)
