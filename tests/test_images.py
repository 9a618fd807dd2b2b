"""Image decoding: every PIL mode to RGB, bad files as reasons, decoding in DataLoader workers."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.images import ImageDataset, ImageReadError, collate_images, load_rgb


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 with distinct values, so a wrong conversion shows."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 10 % 256, cols * 7 % 256, (rows + cols) * 3 % 256], axis=-1).astype(np.uint8)


def test_rgb_png_is_returned_unchanged(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), gradient())


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_other_modes_become_rgb_as_pil_converts_them(tmp_path, mode):
    original = Image.fromarray(gradient()).convert(mode)
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    original.save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == original.size
    expected = Image.open(path).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    if mode == "L":  # gray stays gray: three equal channels
        pixels = np.asarray(image)
        assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under the alpha
    rgba[0, 0, 3] = 255  # one opaque pixel, the rest fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    pixels = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(pixels[0, 0]) == (200, 0, 0)
    assert (pixels[1:, 1:] == 255).all()  # transparent -> white, not the hidden red or black


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    values = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)  # up to 65195
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = np.asarray(load_rgb(tmp_path / "deep.png"))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(pixels[..., 1], expected)
    assert pixels.min() == 0 and 200 < pixels.max() < 255  # clipping would leave almost all pixels at 255


def write_bad_files(directory):
    """Missing, empty, truncated and non-image files, with the reason each should give."""
    Image.fromarray(gradient(64, 64)).save(directory / "whole.jpg", quality=95)
    data = (directory / "whole.jpg").read_bytes()
    (directory / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "text.jpg").write_text("not an image at all")
    return {
        "missing.jpg": "missing file",
        "empty.jpg": "empty file",
        "text.jpg": "not an image",
        "truncated.jpg": "cannot decode",
    }


def test_bad_files_raise_with_a_reason(tmp_path):
    for name, reason in write_bad_files(tmp_path).items():
        with pytest.raises(ImageReadError) as error:
            load_rgb(tmp_path / name)
        assert error.value.reason.startswith(reason)
        assert str(tmp_path / name) in str(error.value)


def test_dataset_decodes_in_workers_and_reports_failures_in_place(tmp_path):
    reasons = write_bad_files(tmp_path)
    names = ["whole.jpg", *reasons, "whole.jpg"]
    dataset = ImageDataset(
        [tmp_path / name for name in names], lambda image: torch.from_numpy(np.asarray(image).copy())
    )
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_images)
    indices, failures, pixels = [], [], []
    for batch_indices, batch_pixels, batch_failures in loader:
        assert batch_pixels is None or batch_pixels.shape[0] == len(batch_indices)
        indices += batch_indices
        failures += batch_failures
        pixels += [] if batch_pixels is None else list(batch_pixels)
    assert indices == [0, 5]
    assert [(index, reason.split(" (")[0]) for index, reason in failures] == [
        (i + 1, r) for i, r in enumerate(reasons.values())
    ]
    assert torch.equal(pixels[0], pixels[1]) and pixels[0].shape == (64, 64, 3)


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte RGBA PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")
    )


def test_images_past_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    """Past PIL's MAX_IMAGE_PIXELS PIL only warns up to twice the limit, and decodes: 100 megapixels cost
    400 MB. Refused at the limit, from the header, whether the file is whole or only claims the size."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(gradient(40, 40)).save(tmp_path / "whole.png")  # 1600 pixels: between the limit and twice it
    (tmp_path / "claims.png").write_bytes(png_claiming(45, 40))
    Image.fromarray(gradient(30, 30)).save(tmp_path / "small.png")
    for name in ("whole.png", "claims.png"):
        with pytest.raises(ImageReadError, match="too large \\(.*exceeds limit of 1000 pixels") as error:
            load_rgb(tmp_path / name)
        assert error.value.reason.startswith("too large")
    assert load_rgb(tmp_path / "small.png").size == (30, 30)


@pytest.mark.parametrize("extension", ["gif", "png", "webp"])
def test_animated_images_give_their_first_frame(tmp_path, extension):
    frames = [Image.new("RGB", (32, 24), color) for color in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / f"animated.{extension}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert Image.open(path).n_frames == 3
    pixels = np.asarray(load_rgb(path))
    assert pixels.shape == (24, 32, 3) and np.abs(pixels.astype(int) - (250, 0, 0)).max() <= 4
