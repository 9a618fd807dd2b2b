"""What predict.py reads and writes around the model: image paths from files, directories and
globs; captions in COCO's results format."""

import glob
import os
from pathlib import Path

from data.atomic import write_json_atomic
from data.errors import InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GLOB_CHARACTERS = set("*?[")


def _images_in(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def expand_image_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, directories' images (sorted) and glob matches, in order, each once.
    A file that does not exist stays in the list: reading it fails for it alone, not the run."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _images_in(path)
            if not found:
                raise InputError(f"{item}: directory holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif GLOB_CHARACTERS & set(item) and not path.exists():
            found = sorted(Path(match) for match in glob.glob(item, recursive=True) if Path(match).is_file())
            if not found:
                raise InputError(f"{item}: no file matches this pattern")
        else:
            found = [path]
        paths.extend(found)
    return list(dict.fromkeys(paths))


def write_coco_results(path: str | os.PathLike, captions: list[tuple[int | str, str]]) -> None:
    """COCO results format, [{"image_id", "caption"}], written atomically; ids must be unique."""
    seen: dict[int | str, int] = {}
    for number, (image_id, _) in enumerate(captions):
        if image_id in seen:
            raise InputError(f"{path}: two images have image id {image_id!r} (inputs {seen[image_id]} and {number})")
        seen[image_id] = number
    write_json_atomic(path, [{"image_id": image_id, "caption": caption} for image_id, caption in captions])
