"""Stage 1 behind parse_coco_clip.py and parse_coco_dino.py: image files to a feature file, each
unique image decoded once (in DataLoader workers) and encoded once, in batches, whatever the number
of its captions. The two scripts share the flags and the run defined here.

`iter_encoded_batches` is the one code path from image files to features (predict.py uses it too);
`extract_features` adds the bookkeeping of Stage 1: rows aligned with captions, skipped images,
partial saves for `--resume`, and the merge of torchrun processes' shares (stages/extract_merge.py).
"""

import argparse
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.annotations import ImageRecord, inside_images_dir, read_annotations
from data.atomic import check_outputs, remove_stale_temporaries
from data.errors import InputError
from data.features import check_pickle_fits
from data.images import IMAGE_CONVERSION, ImageDataset, collate_images
from data.store import check_store_output, default_feature_dtype
from data.webdataset_input import expand_shard_urls
from models.device import DEVICE_HELP, PRECISION_HELP, resolve_precision
from models.encoders import ImageEncoder, Preprocess, load_encoder
from stages.distributed import DistributedContext, close_distributed, init_distributed
from stages.encode import NONFINITE_REASON, encode_pixels
from stages.extract_merge import ExtractionResult, merge_partial_results, skipped_path
from stages.extract_resume import Chunk, PartialStore, fingerprint
from stages.extract_webdataset import WebdatasetResult, add_scale_arguments, extract_webdataset, webdataset_meta

MAX_SKIPPED_SHOWN = 20  # the rest is in the *.skipped.json report
OUTSIDE_REASON = "outside the images directory"  # whether or not the file exists: the report reveals nothing


@dataclass
class EncodedBatch:
    """Features of the images of one batch that decoded, and the reasons of those that did not."""

    indices: list[int]  # positions in the `paths` given, one per feature row
    features: torch.Tensor  # (b, D), or (b, T, D) for token features, float32 on the CPU
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
        ImageDataset([Path(path) for path in paths], preprocess, encoder.spec.resize_dim),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    encoder.to(device).eval()
    bar = tqdm(total=len(paths), unit="img", desc="encoding", disable=not progress, dynamic_ncols=True)
    skipped = 0
    with bar, torch.inference_mode():
        for indices, pixels, failures in loader:
            if pixels is None:
                features = torch.empty(0, *encoder.row_shape)
            else:
                features, bad_rows = encode_pixels(encoder, pixels, device, precision)  # (b, D) or (b, T, D)
                bad = set(bad_rows)
                if bad:  # an image the encoder cannot represent fails alone, not its batch or the file
                    failures = failures + [(indices[row], NONFINITE_REASON) for row in sorted(bad)]
                    keep = [row for row in range(len(indices)) if row not in bad]
                    indices, features = [indices[row] for row in keep], features[keep]
            skipped += len(failures)
            bar.update(len(indices) + len(failures))
            if failures:
                bar.set_postfix(skipped=skipped)
            yield EncodedBatch(indices, features, failures)


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
    allow_outside_images_dir: bool = False,
    output_format: str = "pickle",
    feature_dtype: str | None = None,
) -> ExtractionResult | None:
    """Encode every record's image into `output_file` (rank 0 writes; other ranks return None).

    Each process encodes the images i with i % world_size == rank; results go to the partial store
    every `checkpoint_every` images, and rank 0 merges the store into the feature file. With `resume`,
    images already in the store (encoded or skipped) are not read again. Paths leaving `images_dir`
    are skipped unread unless `allow_outside_images_dir`."""
    context = context or DistributedContext()
    images_dir = Path(images_dir)
    paths = [images_dir / record.file_path for record in records]
    spec = encoder.spec.to_dict()
    file_paths = [record.file_path for record in records]
    settings = fingerprint(spec, precision, str(captions_file), split, str(images_dir), file_paths)
    settings["allow_outside_images_dir"] = allow_outside_images_dir  # it decides which images are skipped
    store = PartialStore(output_file, settings)
    if resume:
        store.check()
    if context.is_main:
        store.start(fresh=not resume)
        for target in (Path(output_file), skipped_path(output_file)):  # left by a killed run's writes
            remove_stale_temporaries(target.parent, glob.escape(target.name))
    if context.enabled:
        dist.barrier()  # nobody reads the store before rank 0 has set it up

    done: set[int] = set()
    if resume:
        saved = store.saved()
        done = set(saved.rows) | set(saved.failed)
    todo = [index for index in range(context.rank, len(records), context.world_size) if index not in done]
    if context.is_main and done:
        print(f"resuming: {len(done)} images done before, {len(todo)} left for this process")

    chunk = Chunk()
    if not allow_outside_images_dir:  # never opened, not even looked at: the annotations chose these paths
        outside = {index for index in todo if not inside_images_dir(images_dir, records[index].file_path)}
        chunk.failures.extend((index, OUTSIDE_REASON) for index in sorted(outside))
        todo = [index for index in todo if index not in outside]
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
        "image_conversion": IMAGE_CONVERSION,
        "precision": precision,
        "split": split,
        "captions_file": str(captions_file),
        "images_dir": str(images_dir),
    }
    return merge_partial_results(records, paths, store, output_file, meta, output_format, feature_dtype)


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of both extraction scripts (ClipCap's names, then the webdataset input and the store)."""
    parser.add_argument(
        "--coco_images_dir",
        default="./data/coco",
        help="directory of the images: COCO's train2014/ and val2014/, or Flickr's images (default: %(default)s)",
    )
    parser.add_argument(
        "--captions_file",
        default="./data/coco/annotations/train_caption.json",
        help="annotations: a ClipCap caption list, COCO captions, or a Karpathy dataset_*.json (default: %(default)s)",
    )
    parser.add_argument(
        "--output_file",
        default=None,
        help="feature file to write (default: ./data/coco/oscar_split_<model>_<split or train>.pkl)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="Karpathy files only: train, val, test, restval or train+restval (the usual 113k-image training set)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoder pass (default: %(default)s)")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader processes decoding images; 0 decodes in the main process (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help=PRECISION_HELP,
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its partial results (<output_file>.partial/) without re-encoding them",
    )
    parser.add_argument(
        "--allow_outside_images_dir",
        action="store_true",
        help="read annotation paths that lead outside --coco_images_dir (absolute or with ..); by default "
        "they are skipped",
    )
    parser.add_argument(
        "--checkpoint_every",
        type=int,
        default=2000,
        help="save partial results every N images, for --resume (default: %(default)s)",
    )
    add_scale_arguments(parser)


def default_output_file(model_name: str, split: str | None, suffix: str = "", extension: str = ".pkl") -> Path:
    """ClipCap's naming: ./data/coco/oscar_split_ViT-B_32_train.pkl (a store: no extension)."""
    name = Path(model_name).name if os.path.isdir(model_name) else model_name.replace("/", "_")
    return Path("./data/coco") / f"oscar_split_{name}{suffix}_{split or 'train'}{extension}"


def _check_arguments(args: argparse.Namespace) -> None:
    if args.input_format == "webdataset":
        if not args.input:
            raise InputError("--input_format webdataset needs --input (the shards' paths or URLs)")
        if args.output_format != "shards":
            raise InputError("--input_format webdataset writes a feature store: give --output_format shards")
    elif not Path(args.coco_images_dir).is_dir():
        raise InputError(f"--coco_images_dir {args.coco_images_dir}: no such directory")
    for flag in ("batch_size", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.num_workers < 0:
        raise InputError(f"--num_workers {args.num_workers}: must be 0 or more")


def _describe_row(row_shape: tuple[int, ...]) -> str:
    """One image's features in words: '512 features', or '50 tokens x 768 features'."""
    return f"{row_shape[0]} tokens x {row_shape[1]} features" if len(row_shape) == 2 else f"{row_shape[0]} features"


def print_summary(result: ExtractionResult, output_file: Path) -> None:
    """Rows, captions, and every skipped image (the first few on screen, all in the report)."""
    features = result.features
    print(
        f"wrote {output_file}: {features.embeddings.shape[0]} images x {_describe_row(features.row_shape)}, "
        f"{len(features.captions)} captions; {len(result.skipped)} images skipped"
    )
    for entry in result.skipped[:MAX_SKIPPED_SHOWN]:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    if len(result.skipped) > MAX_SKIPPED_SHOWN:
        print(f"  ... {len(result.skipped) - MAX_SKIPPED_SHOWN} more")
    if result.skipped:
        print(f"skipped images are listed in {result.skipped_file}")


def print_webdataset_summary(result: WebdatasetResult, output_dir: Path) -> None:
    """Rows, skipped samples by shard (one line each), and where the full list is."""
    print(
        f"wrote {output_dir}: {result.num_images} images x {_describe_row(result.row_shape)}; "
        f"{len(result.skipped)} samples skipped"
    )
    for note in result.shard_notes[:MAX_SKIPPED_SHOWN]:
        print(f"  {note}")
    if result.skipped:
        print(f"skipped samples are listed in {result.skipped_file}")


def run_extraction(
    args: argparse.Namespace,
    model_name: str,
    family: str,
    *,
    feature_type: str | None = None,
    resize_dim: int | None = None,
    crop_dim: int | None = None,
    output_suffix: str = "",
) -> ExtractionResult | WebdatasetResult | None:
    """Read annotations (or list the shards), load the encoder, encode (under torchrun: this process's
    share), and report. `output_suffix` goes into the default output name (e.g. the DINOv2 feature type)."""
    _check_arguments(args)
    shards = args.output_format == "shards"
    default = default_output_file(model_name, args.split, output_suffix, "" if shards else ".pkl")
    output_file = Path(args.output_file or default)
    if shards:
        check_store_output(output_file)
    inputs = {"--captions_file": args.captions_file if args.input_format == "folder" else None}
    outputs = {"its skipped-images report": skipped_path(output_file)}
    check_outputs(outputs if shards else {"--output_file": output_file, **outputs}, inputs)
    context, device = init_distributed(args.device)
    try:
        precision = resolve_precision(args.precision, device)
        if args.input_format == "webdataset":
            urls = expand_shard_urls(args.input)
        else:
            records = read_annotations(args.captions_file, args.split, args.coco_images_dir)
        encoder, preprocess = load_encoder(
            model_name, family=family, feature_type=feature_type, resize_dim=resize_dim, crop_dim=crop_dim
        )
        if not shards:  # before any image is encoded: a pickle of token features is built whole in memory
            check_pickle_fits(output_file, len(records), encoder.row_shape)
        feature_dtype = args.feature_dtype or default_feature_dtype(encoder.row_shape)
        if context.is_main:
            config = {**vars(args), "output_file": str(output_file), "device": str(device), "precision": precision}
            config["feature_dtype"] = feature_dtype
            count = {"shards": len(urls)} if args.input_format == "webdataset" else {"images": len(records)}
            config.update(world_size=context.world_size, **count, encoder=encoder.spec.to_dict())
            print("config:", *(f"  {key}: {value}" for key, value in config.items()), sep="\n")
        common = dict(
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            precision=precision,
            context=context,
            resume=args.resume,
        )
        if args.input_format == "webdataset":
            spec = encoder.spec.to_dict()
            meta = webdataset_meta(spec, precision, args.input, args.wds_image_key, args.wds_caption_key)
            result = extract_webdataset(
                urls,
                encoder,
                preprocess,
                output_file,
                image_key=args.wds_image_key,
                caption_key=args.wds_caption_key,
                feature_dtype=feature_dtype,
                skipped_file=skipped_path(output_file),
                meta=meta,
                **common,
            )
            if result is not None:
                print_webdataset_summary(result, output_file)
            return result
        result = extract_features(
            records,
            args.coco_images_dir,
            encoder,
            preprocess,
            output_file,
            captions_file=args.captions_file,
            split=args.split,
            checkpoint_every=args.checkpoint_every,
            allow_outside_images_dir=args.allow_outside_images_dir,
            output_format=args.output_format,
            feature_dtype=feature_dtype,
            **common,
        )
        if result is not None:
            print_summary(result, output_file)
        return result
    finally:
        close_distributed()
