"""A synthetic captioned image set: scenes of simple shapes drawn with PIL, each with five varied,
truthful captions, written as a Karpathy-style `dataset_synthetic.json` with train/val/test splits.

The design follows what a small random CLIP-style ViT keeps in its pooled embedding (probe figures in
the demo's README section): the background and the objects' color well, their total area (size and
count) fairly, their outline (shape) hardly, their position not at all. So a shape covers the same area
as any other of its size (else area would stand in for shape and blur size and count), backgrounds are
never jittered (background noise drowns the objects' colors), and positions vary but are never described.

    python -m data.synthetic --output_dir outputs/synthetic --num_train 3000 --num_val 200 --num_test 300
"""

import argparse
import collections
import math
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from data.atomic import atomic_write, write_json_atomic
from data.errors import InputError, exit_on_input_error, read_json_input

DATASET_FILE = "dataset_synthetic.json"
SPLITS = ("train", "val", "test")  # also the folders of their images: the Karpathy `filepath`

# Object colors and background colors are disjoint, so an object never vanishes into its background.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.07, 0.08), "large": (0.14, 0.16)}  # equal-area radius as a fraction of the image side
COUNTS = (1, 2, 3)
OBJECT_JITTER = 18  # per-channel RGB noise on each object, so no two objects are pixel-identical
JPEG_QUALITY = 90
MIN_GAP = 3  # pixels between two objects, so they never touch and can be counted

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Caption templates, filled from a scene's attributes, in varied orders and wordings, so the five
# captions of an image differ as human ones do; two leave the size out, as people often would.
TEMPLATES = (
    "{count} {size} {color} {shapes} on a {background} background",
    "{count} {color} {shapes} on a {background} background",
    "a {background} background with {count} {size} {color} {shapes}",
    "{count} {size} {color} {shapes} against a {background} background",
    "there {verb} {count} {color} {shapes} on a {background} background",
    "an image of {count} {size} {color} {shapes} on {background}",
    "{number} {size} {color} {shapes} on a plain {background} background",
    "a picture with {count} {size} {color} {shapes} on a plain {background} background",
)
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class Scene:
    """What one image shows: `count` objects of one shape, color and size on a plain background."""

    shape: str
    color: str
    size: str
    count: int
    background: str
    centers: tuple[tuple[int, int], ...]  # pixel centers of the objects, one per object
    radii: tuple[float, ...]  # equal-area radius of each object: its area is pi * radius**2


def shape_outline(shape: str, x: float, y: float, radius: float) -> list[tuple[float, float]]:
    """Corners of a square or an upward triangle with the area of a circle of `radius` around (x, y).

    Equal areas keep shape out of the total colored area, which is what size and count are read from."""
    if shape == "square":
        half = radius * math.sqrt(math.pi) / 2
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    side = radius * math.sqrt(4 * math.pi / math.sqrt(3))
    circumradius = side / math.sqrt(3)
    angles = (-90, 30, 150)  # upward equilateral triangle
    return [
        (x + circumradius * math.cos(math.radians(a)), y + circumradius * math.sin(math.radians(a))) for a in angles
    ]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, radius: float, **style) -> None:
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), **style)
    else:
        draw.polygon(shape_outline(shape, x, y, radius), **style)


def _extent(shape: str, radius: float) -> float:
    """Distance from the center to the farthest point of the shape."""
    return max(math.hypot(cx, cy) for cx, cy in shape_outline(shape, 0, 0, radius)) if shape != "circle" else radius


def _place_objects(
    rng: random.Random, shape: str, count: int, radius_range: tuple[float, float], image_size: int
) -> list[tuple[int, int, float]]:
    """Centers and radii of `count` objects inside the image, at least MIN_GAP pixels apart.

    Overlap is tested on drawn masks, not bounding circles, so triangles can sit as close as they look."""
    while True:  # a fresh start when a placement paints itself into a corner
        occupied = Image.new("L", (image_size, image_size))
        placed: list[tuple[int, int, float]] = []
        for _ in range(100):
            radius = rng.uniform(*radius_range)
            margin = math.ceil(_extent(shape, radius)) + 1  # keeps the whole object inside
            x, y = rng.randint(margin, image_size - margin - 1), rng.randint(margin, image_size - margin - 1)
            # The object scaled up by 2 * MIN_GAP in radius: its boundary lies >= MIN_GAP outside
            # the object's (a triangle's inradius is 0.78 of its equal-area radius).
            grown = Image.new("L", (image_size, image_size))
            _draw_object(ImageDraw.Draw(grown), shape, x, y, radius + 2 * MIN_GAP, fill=255)
            if ImageChops.multiply(occupied, grown).getbbox() is None:
                _draw_object(ImageDraw.Draw(occupied), shape, x, y, radius, fill=255)
                placed.append((x, y, radius))
                if len(placed) == count:
                    return placed


def sample_scene(rng: random.Random, image_size: int) -> Scene:
    """A scene with every attribute drawn uniformly, so no caption word dominates by design."""
    shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
    count, background = rng.choice(COUNTS), rng.choice(list(BACKGROUNDS))
    low, high = SIZES[size]
    placed = _place_objects(rng, shape, count, (low * image_size, high * image_size), image_size)
    return Scene(
        shape, color, size, count, background, tuple((x, y) for x, y, _ in placed), tuple(r for _, _, r in placed)
    )


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; `rng` jitters each object's color (the same rng state gives the same pixels).

    The background is never jittered: a random ViT's pooled embedding follows the background so
    closely that a few levels of background noise drown the objects' colors (see the probe)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for (x, y), radius in zip(scene.centers, scene.radii):
        fill = tuple(min(255, max(0, c + rng.randint(-OBJECT_JITTER, OBJECT_JITTER))) for c in COLORS[scene.color])
        _draw_object(draw, scene.shape, x, y, radius, fill=fill)
    return image


def scene_captions(scene: Scene, rng: random.Random, number: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`number` different captions of the scene: each names its count, color, shape and background, most its size."""
    noun = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    count_word = "a" if scene.count == 1 else NUMBER_WORDS[scene.count]
    values = {
        "count": count_word,
        "number": "a single" if scene.count == 1 else NUMBER_WORDS[scene.count],
        "size": scene.size,
        "color": scene.color,
        "shapes": noun,
        "background": scene.background,
        "verb": "is" if scene.count == 1 else "are",
    }
    # "a orange" -> "an orange": articles are fixed after filling, whatever the template's word order.
    return [re.sub(r"\ba (?=[aeiou])", "an ", template.format(**values)) for template in rng.sample(TEMPLATES, number)]


def read_caption(caption: str) -> dict[str, str | int | None]:
    """The attributes a caption states, None where it states none: scene_captions read backwards."""
    words = caption.lower().replace(",", " ").split()
    singular = {plural: shape for shape, plural in PLURALS.items()}

    def first(vocabulary: Iterable[str]) -> str | None:
        return next((word for word in words if word in vocabulary), None)

    noun = first([*SHAPES, *PLURALS.values()])
    number = first(NUMBER_WORDS.values())
    if number is not None:
        count = {word: value for value, word in NUMBER_WORDS.items()}[number]
    else:
        count = 1 if noun in SHAPES else None  # "a circle", "a single circle"
    return {
        "color": first(COLORS),
        "background": first(BACKGROUNDS),
        "size": first(SIZES),
        "shape": singular.get(noun, noun),
        "count": count,
    }


def attribute_accuracy(scenes: dict, captions: dict) -> dict[str, float]:
    """Per attribute, the share of images whose caption states it correctly (image id -> scene dict / caption)."""
    correct = collections.Counter()
    for image_id, caption in captions.items():
        stated = read_caption(caption)
        correct.update(name for name, value in stated.items() if value == scenes[image_id][name])
    return {name: correct[name] / len(captions) for name in ("color", "background", "size", "count", "shape")}


def read_scenes(dataset_path: str | os.PathLike, split: str) -> dict[int, dict]:
    """Image id -> the scene a generated dataset file records for it, for the images of `split`."""
    images = read_json_input(dataset_path, "dataset file")["images"]
    return {image["cocoid"]: image["scene"] for image in images if image["split"] == split}


def chance_levels() -> dict[str, float]:
    """Accuracy of a uniform guess per attribute (every attribute is drawn uniformly)."""
    options = {"color": COLORS, "background": BACKGROUNDS, "size": SIZES, "count": COUNTS, "shape": SHAPES}
    return {name: 1 / len(values) for name, values in options.items()}


def iter_split_names(num_train: int, num_val: int, num_test: int) -> Iterator[str]:
    """The split of each image in order: train first, then val, then test."""
    for split, size in zip(SPLITS, (num_train, num_val, num_test)):
        yield from [split] * size


def generate_dataset(
    output_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int = 224,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write JPEGs under `output_dir/{train,val,test}/` and `output_dir/dataset_synthetic.json`; returns the json path.

    Image i is drawn from its own rng seeded by (seed, i), so a set and any prefix of it are
    reproducible whatever else changes. Image ids are 1..N, file names their 12-digit form, which
    predict.py reads back as the same integer id."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 0:
            raise InputError(f"--{name} must be >= 0, got {value}")
    if num_train + num_val + num_test == 0:
        raise InputError("the synthetic set needs at least one image (all split sizes are 0)")
    if image_size < 32:
        raise InputError(f"image size {image_size} is too small to draw shapes on (use >= 32)")
    output_dir = Path(output_dir)
    splits = list(iter_split_names(num_train, num_val, num_test))
    entries, sentence_id = [], 0
    for index, split in enumerate(tqdm(splits, desc="synthetic images", disable=not progress)):
        image_id = index + 1
        rng = random.Random(f"{seed}-{image_id}")  # a string seed hashes deterministically across runs
        scene = sample_scene(rng, image_size)
        filename = f"{image_id:012d}.jpg"
        with atomic_write(output_dir / split / filename) as handle:
            render_scene(scene, image_size, rng).save(handle, format="JPEG", quality=JPEG_QUALITY)
        captions = scene_captions(scene, rng)
        sentences = [
            {"raw": caption, "tokens": caption.replace(",", "").split(), "imgid": index, "sentid": sentence_id + n}
            for n, caption in enumerate(captions)
        ]
        entries.append(
            {
                "filepath": split,
                "filename": filename,
                "imgid": index,
                "cocoid": image_id,
                "split": split,
                "sentids": [sentence["sentid"] for sentence in sentences],
                "sentences": sentences,
                "scene": asdict(scene),  # ground truth, for tests and for anyone probing the set
            }
        )
        sentence_id += len(sentences)
    dataset_path = output_dir / DATASET_FILE
    write_json_atomic(dataset_path, {"dataset": "synthetic", "images": entries})
    return dataset_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of `python -m data.synthetic`, which writes the set alone (demo.py writes it too)."""
    parser = argparse.ArgumentParser(description="Write the synthetic captioned image set (Karpathy-style JSON).")
    parser.add_argument("--output_dir", default="outputs/synthetic", help="where the images and the JSON go")
    parser.add_argument("--num_train", type=int, default=3000, help="training images (5 captions each)")
    parser.add_argument("--num_val", type=int, default=200, help="validation images")
    parser.add_argument("--num_test", type=int, default=300, help="test images")
    parser.add_argument("--image_size", type=int, default=224, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same set")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    """Write the set and say where; returns the dataset file's path."""
    print("data.synthetic:", ", ".join(f"{name}={value}" for name, value in vars(args).items()))
    sizes = {"num_train": args.num_train, "num_val": args.num_val, "num_test": args.num_test}
    path = generate_dataset(args.output_dir, **sizes, image_size=args.image_size, seed=args.seed)
    print(f"wrote {path} and {sum(sizes.values())} images under {args.output_dir}/{{train,val,test}}/")
    return path


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
