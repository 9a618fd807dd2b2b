"""Stage 1 from webdataset shards into a feature store: each input shard becomes one store shard.

Shard i goes to rank i % world_size (on one node or many: torchrun gives the ranks), then to one of
that rank's DataLoader workers. When a shard's last batch is encoded, its .npy and .parquet files are
written, then its record `shard-XXXXX.json`: a shard with a record is done, and `--resume` skips it. A
shard that could not be read to its end (a truncated tar, a failed pipe: command) gets no record.
Rank 0 then lists every record in meta.json, once every sample key is unique, and the store is whole.
"""

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.atomic import write_json_atomic
from data.errors import InputError
from data.images import IMAGE_CONVERSION
from data.store import FEATURE_DTYPES, check_store_output, clear_store, shard_name, write_shard, write_store_meta
from data.webdataset_input import ShardBatch, WebdatasetImages, pass_through
from models.encoders import ImageEncoder, Preprocess
from stages.distributed import DistributedContext
from stages.encode import NONFINITE_REASON, encode_pixels

SETTINGS_FILE = "extraction.json"  # what an unfinished extraction into this directory was run with


@dataclass
class _ShardResults:
    """What one input shard gave so far: feature blocks, keys and captions of its kept samples, skips."""

    url: str
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class WebdatasetResult:
    """What rank 0 wrote: the store's counts and every skipped sample."""

    num_images: int
    row_shape: tuple[int, ...]  # one image's features: (D,) or (T, D)
    skipped: list[dict]  # {"image_id", "shard", "reason"}
    skipped_file: Path
    shard_notes: list[str]  # one line per shard with skipped samples or an early end


def _record_path(output_dir: Path, number: int) -> Path:
    return output_dir / f"{shard_name(number)}.json"


def _read_record(output_dir: Path, number: int) -> dict | None:
    """The record of a finished shard, or None (not done, or its files are gone)."""
    try:
        record = json.loads(_record_path(output_dir, number).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    files = (output_dir / f"{record.get('name')}{suffix}" for suffix in (".npy", ".parquet"))
    return record if all(path.is_file() for path in files) else None


def _check_settings(output_dir: Path, settings: dict) -> None:
    """--resume: refuse partial results made with other settings."""
    path = output_dir / SETTINGS_FILE
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        stored = None
    if stored != settings:
        changed = sorted(key for key in settings if not isinstance(stored, dict) or stored.get(key) != settings[key])
        raise InputError(
            f"{output_dir}: partial results were made with other settings ({', '.join(changed) or 'unknown'}); "
            "run without --resume to start over"
        )


def _shard_note(url: str, results: _ShardResults) -> str | None:
    """One line naming a finished shard, when something in it was skipped or it held nothing."""
    seen = len(results.keys) + len(results.failures)
    if not seen:
        return f"{url}: empty shard (no samples)"
    return f"{url}: {len(results.failures)} of {seen} sample(s) skipped" if results.failures else None


def extract_webdataset(
    urls: list[str],
    encoder: ImageEncoder,
    preprocess: Preprocess,
    output_dir: str | os.PathLike,
    *,
    image_key: str,
    caption_key: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    feature_dtype: str,
    skipped_file: Path,
    meta: dict,
    context: DistributedContext | None = None,
    resume: bool = False,
) -> WebdatasetResult | None:
    """Encode every sample of `urls` into the store `output_dir` (rank 0 writes its meta; others return None)."""
    context = context or DistributedContext()
    output_dir = Path(output_dir)
    spec = encoder.spec.to_dict()
    settings = json.loads(json.dumps({
        "encoder": spec, "precision": precision, "shards": urls,
        "image_key": image_key, "caption_key": caption_key, "feature_dtype": feature_dtype,
    }))  # fmt: skip
    check_store_output(output_dir)
    if resume:
        _check_settings(output_dir, settings)
    if context.is_main:
        if not resume or not (output_dir / SETTINGS_FILE).exists():
            clear_store(output_dir)  # a fresh run: an earlier store's shards must not count as done
        write_json_atomic(output_dir / SETTINGS_FILE, settings)
    if context.enabled:
        dist.barrier()  # nobody looks for finished shards before rank 0 has cleared the old ones

    mine = [(number, url) for number, url in enumerate(urls) if number % context.world_size == context.rank]
    todo = [(number, url) for number, url in mine if not (resume and _read_record(output_dir, number))]
    if resume and len(todo) < len(mine):
        print(f"rank {context.rank}: resuming: {len(mine) - len(todo)} of its {len(mine)} shards done before")
    notes = _encode_shards(todo, encoder, preprocess, output_dir, image_key, caption_key, batch_size,
                           num_workers, device, precision, feature_dtype, context.is_main)  # fmt: skip
    for note in notes:
        print(note)
    if context.enabled:
        dist.barrier()  # every rank's shards are on disk
    if not context.is_main:
        return None
    return _finish_store(urls, output_dir, encoder.row_shape, feature_dtype, skipped_file, meta, notes)


def _encode_shards(
    todo: list[tuple[int, str]],
    encoder: ImageEncoder,
    preprocess: Preprocess,
    output_dir: Path,
    image_key: str,
    caption_key: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    feature_dtype: str,
    progress: bool,
) -> list[str]:
    """Encode this rank's shards, writing each as its last batch arrives; returns the notes on bad shards."""
    if not todo:
        return []
    dataset = WebdatasetImages(todo, image_key, caption_key, preprocess, encoder.spec.resize_dim, batch_size)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset batches, so that a batch never mixes shards
        num_workers=min(num_workers, len(todo)),  # a worker without a shard would only start and stop
        collate_fn=pass_through,
        pin_memory=device.type == "cuda",
    )
    encoder.to(device).eval()
    pending: dict[int, _ShardResults] = {}
    notes: list[str] = []
    bar = tqdm(total=len(todo), unit="shard", desc="encoding", disable=not progress, dynamic_ncols=True)
    with bar, torch.inference_mode():
        for batch in loader:
            results = pending.setdefault(batch.shard, _ShardResults(batch.url))
            _add_batch(results, batch, encoder, device, precision)
            if not batch.last:
                continue
            del pending[batch.shard]
            bar.update()
            if batch.error is not None:  # not recorded: its samples after the error are missing; --resume retries it
                seen = len(results.keys) + len(results.failures)
                notes.append(
                    f"{batch.url}: {batch.error} after {seen} sample(s); not done, run again with --resume to retry it"
                )
                continue
            _write_shard(output_dir, batch.shard, results, encoder.row_shape, feature_dtype)
            if (note := _shard_note(batch.url, results)) is not None:
                notes.append(note)
    return notes


def _add_batch(
    results: _ShardResults, batch: ShardBatch, encoder: ImageEncoder, device: torch.device, precision: str
) -> None:
    keys, captions, failures = batch.keys, batch.captions, list(batch.failures)
    if batch.pixels is not None:
        features, bad = encode_pixels(encoder, batch.pixels, device, precision)  # (b, D) or (b, T, D)
        if bad:  # a sample the encoder cannot represent is skipped alone
            failures += [(keys[row], NONFINITE_REASON) for row in bad]
            keep = [row for row in range(len(keys)) if row not in set(bad)]
            keys, captions, features = [keys[row] for row in keep], [captions[row] for row in keep], features[keep]
        results.features.append(features)
    results.keys += keys
    results.captions += captions
    results.failures += failures


def _write_shard(
    output_dir: Path, number: int, results: _ShardResults, row_shape: tuple[int, ...], dtype: str
) -> None:
    """The shard's files, then its record (which marks it done)."""
    features = torch.cat(results.features) if results.features else torch.empty(0, *row_shape)
    captions = [(key, caption, row) for row, (key, caption) in enumerate(zip(results.keys, results.captions))]
    skipped = [{"image_id": key, "reason": reason} for key, reason in results.failures]
    extra = {"source": results.url, "num_skipped": len(skipped)}
    record = write_shard(output_dir, shard_name(number), features.numpy().astype(np.float32), captions, dtype, extra)
    write_json_atomic(_record_path(output_dir, number), {**record, "skipped": skipped})


def _finish_store(
    urls: list[str],
    output_dir: Path,
    row_shape: tuple[int, ...],
    dtype: str,
    skipped_file: Path,
    meta: dict,
    notes: list[str],
) -> WebdatasetResult:
    """Rank 0: every shard's record into meta.json, the skipped samples into their report."""
    records = [_read_record(output_dir, number) for number in range(len(urls))]
    missing = [url for url, record in zip(urls, records) if record is None]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(urls)} shard(s) have no results, e.g. {missing[0]}; "
            "run the same command with --resume to retry them"
        )
    _refuse_repeated_keys(output_dir, urls, records)
    skipped = [
        {"image_id": entry["image_id"], "shard": record["source"], "reason": entry["reason"]}
        for record in records
        for entry in record["skipped"]
    ]
    write_json_atomic(skipped_file, {"output_file": str(output_dir), "num_skipped": len(skipped), "skipped": skipped})
    num_images = sum(record["rows"] for record in records)
    if not num_images:
        raise InputError(f"no image could be encoded ({len(skipped)} skipped, listed in {skipped_file})")
    shards = [{key: value for key, value in record.items() if key != "skipped"} for record in records]
    write_store_meta(output_dir, {**meta, "num_skipped": len(skipped)}, shards, row_shape, dtype)
    for number in range(len(urls)):  # the store is whole: the extraction's bookkeeping goes
        _record_path(output_dir, number).unlink(missing_ok=True)
    (output_dir / SETTINGS_FILE).unlink(missing_ok=True)
    return WebdatasetResult(num_images, row_shape, skipped, skipped_file, notes)


def _refuse_repeated_keys(output_dir: Path, urls: list[str], records: list[dict]) -> None:
    """A key is its sample's image id: two samples with one key would be one image with both captions, so
    that SCST and evaluation see fewer images than were encoded. Refused naming the key's shards."""
    keys = [
        pq.read_table(output_dir / f"{record['name']}.parquet", columns=["image_id"]).column(0).cast(pa.string())
        for record in records
    ]  # one caption per sample: one entry per kept sample; an empty shard's column is int64
    counts = pc.value_counts(pa.chunked_array(keys, type=pa.string()))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return
    key = repeated[0]["values"].as_py()
    first, second = [url for url, column in zip(urls, keys) for value in column.to_pylist() if value == key][:2]
    where = f"twice in {first}" if first == second else f"in {first} and {second}"
    raise InputError(
        f"{len(repeated)} key(s) are used by more than one sample, e.g. {key!r} {where}; a sample's key "
        "is its image id, so keys must be unique across the shards (rename them, then run again without --resume)"
    )


def webdataset_meta(spec: dict, precision: str, pattern: str, image_key: str, caption_key: str) -> dict:
    """The store's meta: the pickle's fields, with the input in place of the annotation file."""
    return {
        "encoder": spec,
        "feature_type": spec["feature_type"],
        "image_size": spec["crop_dim"],
        "image_conversion": IMAGE_CONVERSION,
        "precision": precision,
        "split": None,
        "input_format": "webdataset",
        "input": pattern,
        "wds_image_key": image_key,
        "wds_caption_key": caption_key,
    }


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """The extraction flags for large data sets: webdataset input, feature store output."""
    scale = parser.add_argument_group("large data sets: webdataset input, feature store output")
    scale.add_argument(
        "--input_format",
        default="folder",
        choices=("folder", "webdataset"),
        help="folder: --coco_images_dir with --captions_file; webdataset: tar shards given by --input (default: %(default)s)",
    )
    scale.add_argument(
        "--input",
        help='webdataset shards: a path or URL pattern, e.g. "shards/{00000..00999}.tar" or "pipe:aws s3 cp s3://b/{0..9}.tar -"',
    )
    scale.add_argument("--wds_image_key", default="jpg", help="the image member's extension (default: %(default)s)")
    scale.add_argument("--wds_caption_key", default="txt", help="the caption member's extension (default: %(default)s)")
    scale.add_argument(
        "--output_format",
        default="pickle",
        choices=("pickle", "shards"),
        help="pickle: one ClipCap-compatible file; shards: a feature store directory, memory-mapped when read "
        "(webdataset input needs it) (default: %(default)s)",
    )
    scale.add_argument(
        "--feature_dtype",
        default=None,
        choices=tuple(FEATURE_DTYPES),
        help="the store's float type (--output_format shards) (default: fp32, fp16 for --feature_type patch_tokens)",
    )
