"""Caption annotation files in the three formats people have, detected from their content:

- ClipCap list: `[{"image_id", "caption", "id"?}, ...]` (COCO images, train2014 else val2014)
- COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`
- Karpathy: `{"images": [{"filepath"?, "filename", "split", "cocoid"?, "imgid"?, "sentences": [{"raw"}]}]}`

Each becomes one ImageRecord per unique image, in order of first appearance, with every caption.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.errors import InputError, read_json_input, utf8

KARPATHY_SPLITS = {
    "train": ("train",),
    "val": ("val",),
    "test": ("test",),
    "restval": ("restval",),
    "train+restval": ("train", "restval"),  # the usual 113k-image COCO training set
}
COCO_FOLDERS = ("train2014", "val2014", "train2017", "val2017", "test2014", "test2017")
# COCO_val2014_000000123456 (COCO 2014), 000000123456 (COCO 2017), 1000092795 (Flickr30k): the number.
NUMBERED_STEM = re.compile(r"(?:COCO_[a-z]+\d{4}_)?(\d+)")


def image_id_from_path(path: str | os.PathLike) -> int | str:
    """COCO_val2014_000000123456.jpg, 000000123456.jpg -> 123456; any other file -> the number its stem is,
    else the stem. predict.py names images this way, so ids from files match ids from annotations."""
    stem = Path(path).stem
    match = NUMBERED_STEM.fullmatch(stem)
    return int(match.group(1)) if match else stem


def inside_images_dir(images_dir: str | os.PathLike, file_path: str) -> bool:
    """Whether `file_path` (from an annotation file) stays inside `images_dir` once `..` and absolute parts
    are normalized. Links are not followed: a train2014/ linked to another disk is a normal set-up."""
    root = os.path.normpath(os.path.abspath(images_dir))
    full = os.path.normpath(os.path.join(root, file_path))
    return full != root and os.path.commonpath([root, full]) == root


MAX_SHARED_IDS_SHOWN = 3


def _refuse_shared_ids(source: str, shared: list[tuple[Any, str, str]]) -> None:
    # Merging them would drop all but one file and give its captions to the wrong image.
    if shared:
        examples = "; ".join(
            f"id {image_id!r}: {first} and {second}" for image_id, first, second in shared[:MAX_SHARED_IDS_SHOWN]
        )
        raise InputError(f"{source}: {len(shared)} image(s) share an image id with another file, e.g. {examples}")


@dataclass
class ImageRecord:
    """One image and all its captions."""

    image_id: int | str  # COCO id / cocoid, else image_id_from_path(file name)
    file_path: str  # relative to the images directory, e.g. "val2014/COCO_val2014_000000000042.jpg"
    captions: list[str]  # in file order


def _coco_list_path(image_id: int, images_dir: Path | None) -> str:
    """ClipCap's rule: the train2014 file if it exists, else the val2014 one."""
    train = f"train2014/COCO_train2014_{image_id:012d}.jpg"
    if images_dir is None or (images_dir / train).exists():
        return train
    return f"val2014/COCO_val2014_{image_id:012d}.jpg"


def _coco_file_path(file_name: str, images_dir: Path | None) -> str:
    """COCO's file_name has no folder; find the folder (train2014/, val2014/, ...) that holds it."""
    if images_dir is None or (images_dir / file_name).exists():
        return file_name
    named = [folder for folder in COCO_FOLDERS if f"_{folder}_" in file_name]  # COCO_val2014_... names its folder
    for folder in named + [folder for folder in COCO_FOLDERS if folder not in named]:
        if (images_dir / folder / file_name).exists():
            return f"{folder}/{file_name}"
    return f"{named[0]}/{file_name}" if named else file_name


def _as_image_id(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: image_id {value!r} is not an integer")
    return value


def _caption(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: caption is {type(value).__name__}, expected a string")
    utf8(value, f"{where}: caption")  # every stage hashes, tokenizes or writes it as UTF-8
    return value


def _read_clipcap_list(entries: list, source: str, images_dir: Path | None) -> list[ImageRecord]:
    records: dict[int, ImageRecord] = {}
    for number, entry in enumerate(entries):
        where = f"{source}: entry {number}"
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise InputError(f"{where}: expected an object with 'image_id' and 'caption'")
        image_id = _as_image_id(entry["image_id"], where)
        if image_id not in records:
            records[image_id] = ImageRecord(image_id, _coco_list_path(image_id, images_dir), [])
        records[image_id].captions.append(_caption(entry["caption"], where))
    return list(records.values())


def _read_coco_captions(content: dict, source: str, images_dir: Path | None) -> list[ImageRecord]:
    images, annotations = content["images"], content["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise InputError(f"{source}: 'images' and 'annotations' must be lists")
    file_names: dict[int, str] = {}
    shared: list[tuple[Any, str, str]] = []
    for number, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise InputError(f"{source}: images[{number}] needs 'id' and a string 'file_name'")
        image_id = _as_image_id(image["id"], f"{source}: images[{number}]")
        if file_names.setdefault(image_id, image["file_name"]) != image["file_name"]:
            shared.append((image_id, file_names[image_id], image["file_name"]))
    _refuse_shared_ids(source, shared)
    records: dict[int, ImageRecord] = {}
    for number, annotation in enumerate(annotations):
        where = f"{source}: annotations[{number}]"
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise InputError(f"{where}: expected an object with 'image_id' and 'caption'")
        image_id = _as_image_id(annotation["image_id"], where)
        if image_id not in file_names:
            raise InputError(f"{where}: image_id {image_id} is not in 'images'")
        if image_id not in records:
            records[image_id] = ImageRecord(image_id, _coco_file_path(file_names[image_id], images_dir), [])
        records[image_id].captions.append(_caption(annotation["caption"], where))
    return list(records.values())


def _read_karpathy(images: list, source: str, split: str) -> list[ImageRecord]:
    wanted = KARPATHY_SPLITS[split]
    records: dict[int | str, ImageRecord] = {}
    shared: list[tuple[Any, str, str]] = []
    for number, image in enumerate(images):
        where = f"{source}: images[{number}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise InputError(f"{where}: needs a string 'filename'")
        if image.get("split") not in wanted:
            continue
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise InputError(f"{where}: 'sentences' must be a list of objects with 'raw'")
        file_path = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
        # Flickr's imgid only counts images, so it is not used: the file name gives the id predict.py gives.
        image_id = _as_image_id(image["cocoid"], where) if "cocoid" in image else image_id_from_path(image["filename"])
        if image_id not in records:
            records[image_id] = ImageRecord(image_id, file_path, [])
        elif records[image_id].file_path != file_path:
            shared.append((image_id, records[image_id].file_path, file_path))
        records[image_id].captions.extend(_caption(s["raw"], where) for s in sentences)
    _refuse_shared_ids(source, shared)
    return [record for record in records.values() if record.captions]  # an image without captions has no row


def read_annotations(
    path: str | os.PathLike, split: str | None = None, images_dir: str | os.PathLike | None = None
) -> list[ImageRecord]:
    """One record per unique image with a caption, in first-appearance order; the format is detected.

    `split` selects Karpathy images (train|val|test|restval|train+restval) and is an error for the other
    formats. With `images_dir`, COCO paths go to the folder that holds the file (train2014/ or val2014/);
    without it, ClipCap-list images are taken to be in train2014/."""
    source = str(path)
    content = read_json_input(path, "annotation file")
    images_dir = Path(images_dir) if images_dir is not None else None
    is_karpathy = (
        isinstance(content, dict)
        and isinstance(content.get("images"), list)
        and "annotations" not in content
        and any(isinstance(image, dict) and "sentences" in image for image in content["images"])
    )
    if is_karpathy:
        if split not in KARPATHY_SPLITS:
            given = "no --split" if split is None else f"split {split!r}"
            raise InputError(f"{source}: a Karpathy file needs a split ({', '.join(KARPATHY_SPLITS)}); got {given}")
        records = _read_karpathy(content["images"], source, split)
    elif isinstance(content, list) or (isinstance(content, dict) and {"images", "annotations"} <= content.keys()):
        if split is not None:
            raise InputError(f"{source}: split {split!r} given, but this format has no splits (only Karpathy's has)")
        if isinstance(content, list):
            records = _read_clipcap_list(content, source, images_dir)
        else:
            records = _read_coco_captions(content, source, images_dir)
    else:
        raise InputError(
            f"{source}: unrecognized annotation format (expected a ClipCap caption list, COCO captions "
            "with 'images' and 'annotations', or a Karpathy file with 'images' and 'sentences')"
        )
    if not records:
        raise InputError(f"{source}: no captioned images" + (f" in split {split!r}" if split else ""))
    return records


def image_files(path: str | os.PathLike, split: str | None, images_dir: str | os.PathLike) -> dict[int | str, Path]:
    """Each annotated image's file (`images_dir` / its annotation path), by image id."""
    records = read_annotations(path, split, images_dir)
    return {record.image_id: Path(images_dir) / record.file_path for record in records}
