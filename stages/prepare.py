"""Data preparation: each data set's files (the manifest), fetched and verified, extracted into the layout
parse_coco_clip.py reads (`--coco_images_dir`, `--captions_file`), checked against its Karpathy split file,
and the extraction commands to run next."""

import argparse
import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

from data.annotations import image_files
from data.atomic import atomic_directory, atomic_write, check_output_directory, check_output_target
from data.download import RemoteFile, download, extract_members, read_member, verify_file, zip_members
from data.errors import InputError, read_json_input

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
# Sizes and checksums as others publish them: COCO publishes none; these md5s are the ones LAVIS and
# torchvision-style loaders check (see docs/prepare_data.md). None: nobody publishes one we know of.
KARPATHY_ZIP = RemoteFile("caption_datasets.zip", KARPATHY_URL, checksum="md5:4fa8c08369d22fe16e41dc124bd1adc2")
FLICKR8K_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
FLICKR30K_FORM = "https://shannon.cs.illinois.edu/DenotationGraph/"


@dataclass(frozen=True)
class Tree:
    """A folder of the layout and the zip it is extracted from (its files ending in `suffix`, flattened)."""

    folder: str
    source: RemoteFile
    suffix: str = ".jpg"


@dataclass(frozen=True)
class Dataset:
    """A data set's layout under `--root`/`name`: its extracted trees, its Karpathy file, its images folder."""

    name: str
    trees: tuple[Tree, ...]
    karpathy_file: str
    images_dir: str  # relative to the data set's folder: what --coco_images_dir names ("." for COCO)
    train_split: str  # the Karpathy split the training features come from


DATASETS = {
    "coco": Dataset(
        "coco",
        (
            Tree("train2014", RemoteFile(
                "train2014.zip", "http://images.cocodataset.org/zips/train2014.zip", 13510573713,
                "md5:0da8c0bd3d6becc4dcb32757491aca88", images=82783,
            )),
            Tree("val2014", RemoteFile(
                "val2014.zip", "http://images.cocodataset.org/zips/val2014.zip", 6645013297,
                "md5:a3d79f5ed8d289b7a7554ce06a5782b3", images=40504,
            )),
        ),
        "dataset_coco.json",
        ".",
        "train+restval",
    ),
    "flickr8k": Dataset(
        "flickr8k",
        (
            Tree("Flicker8k_Dataset", RemoteFile(
                "Flickr8k_Dataset.zip", f"{FLICKR8K_URL}/Flickr8k_Dataset.zip",
                checksum="md5:f18a1e2920de5bd84dae7cf08ec78978",
            )),
            Tree("Flickr8k_text", RemoteFile(
                "Flickr8k_text.zip", f"{FLICKR8K_URL}/Flickr8k_text.zip", checksum="md5:bf6c1abcb8e4a833b7f922104de18627"
            ), suffix=""),
        ),
        "dataset_flickr8k.json",
        "Flicker8k_Dataset",
        "train",
    ),
    # The zip comes from the request form (or a copy of it), so its bytes vary: its image count is checked.
    "flickr30k": Dataset(
        "flickr30k",
        (Tree("flickr30k-images", RemoteFile("flickr30k-images.zip", None, images=31783)),),
        "dataset_flickr30k.json",
        "flickr30k-images",
        "train",
    ),
}
EVALUATION_SPLITS = ("val", "test")


def with_overrides(dataset: Dataset, manifest: str | None) -> tuple[Dataset, RemoteFile]:
    """`dataset` and the Karpathy zip with the sizes, checksums and image counts of `--manifest` (a JSON
    object: file name -> {"size", "checksum", "images"}), the tests' door for their small fixtures."""
    if manifest is None:
        return dataset, KARPATHY_ZIP
    overrides = read_json_input(manifest, "manifest")
    fields = {field.name for field in dataclasses.fields(RemoteFile)} - {"name", "url"}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) and v.keys() <= fields for v in overrides.values()):
        raise InputError(f"--manifest {manifest}: expected {{file name: {{{', '.join(sorted(fields))}}}}}")

    def replaced(remote: RemoteFile) -> RemoteFile:
        return dataclasses.replace(remote, **overrides.get(remote.name, {}))

    trees = tuple(dataclasses.replace(tree, source=replaced(tree.source)) for tree in dataset.trees)
    return dataclasses.replace(dataset, trees=trees), replaced(KARPATHY_ZIP)


def _local_zip(args: argparse.Namespace, dataset: Dataset) -> Path | None:
    """The user's Flickr30k zip (`--flickr30k_zip`), checked to exist; None for the other data sets."""
    if dataset.name != "flickr30k":
        if args.flickr30k_zip is not None:
            raise InputError(f"--flickr30k_zip is for flickr30k, not {dataset.name}")
        return None
    if args.flickr30k_zip is None:
        raise InputError(
            f"flickr30k needs --flickr30k_zip PATH: its images come only through the request form at {FLICKR30K_FORM}"
        )
    path = Path(args.flickr30k_zip)
    if not path.is_file():
        raise InputError(f"--flickr30k_zip {path}: no such file")
    return path


def _extract_tree(zip_path: Path, tree: Tree, target: Path) -> None:
    """`tree`'s files of `zip_path`, checked (names, CRCs, image count), in `target`, which appears whole or not."""
    members = zip_members(zip_path, tree.suffix)
    expected = tree.source.images
    if expected is not None and len(members) != expected:
        raise InputError(f"{zip_path}: {len(members)} images where {expected} are expected; nothing extracted")
    if not members:
        raise InputError(f"{zip_path}: no {tree.suffix or 'file'} members; nothing extracted")
    with atomic_directory(target) as temporary:
        extract_members(zip_path, members, temporary)


def _extract_karpathy(zip_path: Path, name: str, target: Path) -> None:
    """The member `name` of the Karpathy zip, written to `target` atomically."""
    members = zip_members(zip_path, ".json")
    if name not in members:
        raise InputError(f"{zip_path}: has no {name}")
    with atomic_write(target) as handle:
        handle.write(read_member(zip_path, members[name]))


def _check_images(dataset_dir: Path, dataset: Dataset) -> None:
    """Every image the Karpathy file names (in the splits the commands use) is in the layout."""
    captions_file = dataset_dir / dataset.karpathy_file
    images_dir = dataset_dir / dataset.images_dir
    for split in (dataset.train_split, *EVALUATION_SPLITS):
        missing = [path for path in image_files(captions_file, split, images_dir).values() if not path.is_file()]
        if missing:
            raise InputError(
                f"{captions_file}: {len(missing)} images of split {split} are not in {images_dir} (first: {missing[0]})"
            )


def extraction_commands(dataset_dir: Path, dataset: Dataset) -> list[str]:
    """The parse_coco_clip.py commands that turn the layout into train, val and test feature files."""
    captions_file = shlex.quote(str(dataset_dir / dataset.karpathy_file))
    images_dir = shlex.quote(str(dataset_dir / dataset.images_dir))
    splits = (dataset.train_split, *EVALUATION_SPLITS)
    outputs = [shlex.quote(str(dataset_dir / f"clip_{split.split('+')[0]}.pkl")) for split in splits]  # clip_train.pkl
    return [
        f"python parse_coco_clip.py --clip_model_type ViT-B/32 --coco_images_dir {images_dir} "
        f"--captions_file {captions_file} --split {split} --output_file {output}"
        for split, output in zip(splits, outputs)
    ]


def run_prepare(args: argparse.Namespace) -> list[str]:
    """Fetch, verify, extract and check one data set as the flags say; prints and returns the next commands."""
    dataset, karpathy_zip = with_overrides(DATASETS[args.dataset], args.manifest)
    local_zip = _local_zip(args, dataset)
    root = Path(args.root)
    dataset_dir = root / dataset.name
    downloads = root / "downloads"
    inputs = {"--flickr30k_zip": local_zip}
    # Before any download: an existing tree is kept unless --overwrite (19 GB later is too late to say so).
    for tree in dataset.trees:
        check_output_directory(f"{dataset.name}/{tree.folder}", dataset_dir / tree.folder, inputs, args.overwrite)
    captions_file = dataset_dir / dataset.karpathy_file
    check_output_target(captions_file)
    if captions_file.exists() and not args.overwrite:
        raise InputError(f"{captions_file}: already exists; give --overwrite to replace it")

    zips = []
    for tree in dataset.trees:
        if local_zip is not None:
            verify_file(local_zip, tree.source, str(local_zip))
            zips.append(local_zip)
        else:
            zips.append(download(tree.source, downloads, args.mirror))
    karpathy = download(karpathy_zip, downloads, args.mirror)

    for tree, zip_path in zip(dataset.trees, zips):
        _extract_tree(zip_path, tree, dataset_dir / tree.folder)
    _extract_karpathy(karpathy, dataset.karpathy_file, captions_file)
    _check_images(dataset_dir, dataset)

    commands = extraction_commands(dataset_dir, dataset)
    print(f"{dataset.name} is ready in {dataset_dir}; the downloads in {downloads} may be deleted. Next, the features:")
    print("\n".join(commands))
    return commands
