"""A contact sheet: thumbnails of captioned images in a grid, each with its caption below it."""

import os
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from data.atomic import atomic_write
from data.errors import InputError
from data.images import load_rgb

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
MARGIN = 8  # pixels around and between cells
LINE_SPACING = 4
MAX_CAPTION_LINES = 4


def sheet_format(path: str | os.PathLike) -> str:
    """PIL's format name for the sheet's file extension (written to a temporary file, so not guessed)."""
    suffix = Path(path).suffix
    image_format = Image.registered_extensions().get(suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise InputError(f"{path}: cannot write a contact sheet as {suffix or 'a file without extension'}")
    return image_format


def _wrap(caption: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most MAX_CAPTION_LINES lines (the last one ellipsized)."""
    average = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    lines = textwrap.wrap(caption, width=max(8, int(width / average))) or [""]
    if len(lines) > MAX_CAPTION_LINES:
        lines = lines[:MAX_CAPTION_LINES]
        lines[-1] = lines[-1][:-1] + "…"
    return lines


def draw_contact_sheet(
    images: list[str | os.PathLike],
    captions: list[str],
    output: str | os.PathLike,
    *,
    columns: int = 4,
    thumbnail_size: int = 256,
) -> Path:
    """Draw `images` (paths) with `captions` in a grid of `columns` and save it atomically to `output`."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise InputError(f"{output}: no captioned image to draw")
    output = Path(output)
    image_format = sheet_format(output)
    font = ImageFont.load_default(size=14)
    line_height = font.getbbox("Ag")[3] + LINE_SPACING
    text_height = MAX_CAPTION_LINES * line_height
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)  # ceiling division
    cell_width, cell_height = thumbnail_size + MARGIN, thumbnail_size + text_height + MARGIN
    sheet = Image.new("RGB", (columns * cell_width + MARGIN, rows * cell_height + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for number, (path, caption) in enumerate(zip(images, captions)):
        left = MARGIN + (number % columns) * cell_width
        top = MARGIN + (number // columns) * cell_height
        thumbnail = ImageOps.contain(load_rgb(path), (thumbnail_size, thumbnail_size))  # up or down, aspect kept
        # Centered in its square, so cells line up whatever the aspect ratio.
        sheet.paste(
            thumbnail,
            (left + (thumbnail_size - thumbnail.width) // 2, top + (thumbnail_size - thumbnail.height) // 2),
        )
        for line_number, line in enumerate(_wrap(caption, font, thumbnail_size)):
            draw.text((left, top + thumbnail_size + 2 + line_number * line_height), line, fill=TEXT_COLOR, font=font)
    with atomic_write(output, "wb") as handle:
        sheet.save(handle, format=image_format)
    return output
