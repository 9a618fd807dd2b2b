"""Image files to RGB pixels: decoding that survives bad files, in DataLoader workers."""

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data.errors import InputError

WHITE = (255, 255, 255, 255)
# How _to_rgb turns a file into RGB, recorded in feature files: OpenAI CLIP's preprocessing drops alpha
# instead, so features of transparent images differ from theirs.
IMAGE_CONVERSION = "RGB; transparency (alpha, transparent palette) composited over white; 16-bit scaled to 8-bit"
# A 20000x1 image passes PIL's pixel limit, but its short side resized to 224 makes 4.5 million x 224.
MAX_RESIZED_PIXELS = 50_000_000


class ImageReadError(InputError):
    """An image file that cannot be used; `reason` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency over white (as transformers' processors do),
    16/32-bit integer gray scaled down rather than clipped at 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit files span 0..65535 and clipping would turn almost every pixel white; a 32-bit
        # "I" image counts as 16-bit only when its values go past 8 bits.
        sixteen_bit = image.mode != "I" or pixels.max() > 255
        scale = 255.0 / 65535.0 if sixteen_bit else 1.0
        gray = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(short_side): the short side becomes `short_side`."""
    width, height = max(width, 1), max(height, 1)
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def load_rgb(path: str | os.PathLike, resize_dim: int | None = None) -> Image.Image:
    """Decode an image fully and return it as RGB; raises ImageReadError with the reason otherwise.
    With `resize_dim`, an image whose short side resized to it would exceed MAX_RESIZED_PIXELS is refused
    before it is decoded."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "missing file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file")
    return _decode(path, path, resize_dim)


def decode_rgb(data: bytes, name: str, resize_dim: int | None = None) -> Image.Image:
    """load_rgb for an image's bytes (a webdataset sample's member): the same checks and conversion."""
    if not data:
        raise ImageReadError(name, "empty file")
    return _decode(io.BytesIO(data), name, resize_dim)


def _decode(source: Path | io.BytesIO, name: str | os.PathLike, resize_dim: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice it PIL only warns, and decodes: a 100 kB PNG of 170 megapixels
            # would cost gigabytes. Refused at the limit, from the header.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if resize_dim is not None:
                    width, height = resized_size(*image.size, resize_dim)
                    if width * height > MAX_RESIZED_PIXELS:
                        raise ImageReadError(
                            name,
                            f"too large once resized ({width}x{height}, over {MAX_RESIZED_PIXELS // 10**6} megapixels)",
                        )
                image.load()  # decode now: a truncated file fails here, not later in a transform
                return _to_rgb(image)
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(name, f"too large ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports corrupt data with these
        raise ImageReadError(name, f"cannot decode ({error})") from None


class ImageDataset(Dataset):
    """Decodes and preprocesses `paths[i]`; a bad file gives its reason instead of pixels."""

    def __init__(
        self, paths: list[Path], preprocess: Callable[[Image.Image], torch.Tensor], resize_dim: int | None = None
    ):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.resize_dim = resize_dim  # the preprocessing's short side, to refuse images it would blow up

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_rgb(self.paths[index], self.resize_dim)
        except ImageReadError as error:
            return index, None, error.reason
        return index, self.preprocess(image), None


def collate_images(
    batch: list[tuple[int, Any, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the decoded images of a batch; failures travel beside them as (index, reason)."""
    decoded = [(index, pixels) for index, pixels, _ in batch if pixels is not None]
    failures = [(index, reason) for index, pixels, reason in batch if pixels is None]
    indices = [index for index, _ in decoded]
    pixels = torch.stack([pixels for _, pixels in decoded]) if decoded else None  # (b, 3, H, W)
    return indices, pixels, failures
