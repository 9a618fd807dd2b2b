"""The synthetic captioned set: deterministic, truthful captions, the right splits, a valid Karpathy file."""

import json
import random

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label

from data.annotations import read_annotations
from data.errors import InputError
from data.synthetic import (
    BACKGROUNDS,
    COLORS,
    DATASET_FILE,
    NUMBER_WORDS,
    PLURALS,
    SHAPES,
    SIZES,
    Scene,
    attribute_accuracy,
    chance_levels,
    generate_dataset,
    read_caption,
    read_scenes,
    render_scene,
    sample_scene,
    scene_captions,
)

SPLIT_SIZES = {"train": 12, "val": 3, "test": 5}


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """A small set, and its parsed dataset file."""
    root = tmp_path_factory.mktemp("synthetic")
    path = generate_dataset(root, num_train=12, num_val=3, num_test=5, seed=7, progress=False)
    return root, json.loads(path.read_text())


def _words(caption: str) -> list[str]:
    return caption.replace(",", "").split()


def test_same_seed_same_set_other_seed_other_set(synthetic_set, tmp_path):
    root, content = synthetic_set
    again = generate_dataset(tmp_path / "again", num_train=12, num_val=3, num_test=5, seed=7, progress=False)
    assert json.loads(again.read_text()) == content
    for image in content["images"]:
        relative = f"{image['filepath']}/{image['filename']}"
        assert (root / relative).read_bytes() == (tmp_path / "again" / relative).read_bytes()
    other = generate_dataset(tmp_path / "other", num_train=12, num_val=3, num_test=5, seed=8, progress=False)
    assert [image["scene"] for image in json.loads(other.read_text())["images"]] != [
        image["scene"] for image in content["images"]
    ]


def test_split_sizes_and_karpathy_layout(synthetic_set):
    root, content = synthetic_set
    assert content["dataset"] == "synthetic"
    assert [image["split"] for image in content["images"]] == [
        split for split, size in SPLIT_SIZES.items() for _ in range(size)
    ]
    sentence_ids = [sentence["sentid"] for image in content["images"] for sentence in image["sentences"]]
    assert len(set(sentence_ids)) == len(sentence_ids)
    for image in content["images"]:
        assert len(image["sentences"]) == 5 and image["sentids"] == [s["sentid"] for s in image["sentences"]]
        assert all(s["imgid"] == image["imgid"] and s["tokens"] == _words(s["raw"]) for s in image["sentences"])
    seen_ids = set()
    for split, size in SPLIT_SIZES.items():
        records = read_annotations(root / DATASET_FILE, split)  # the reader every stage uses
        assert len(records) == size
        for record in records:
            assert (root / record.file_path).is_file() and record.file_path.startswith(f"{split}/")
            # predict.py names an image by its file's number: it must be the id the references use
            assert int(record.file_path.split("/")[1].removesuffix(".jpg")) == record.image_id
            assert len(record.captions) == 5 and len(set(record.captions)) == 5
        seen_ids |= {record.image_id for record in records}
    assert len(seen_ids) == sum(SPLIT_SIZES.values())


def test_captions_name_the_scene_and_nothing_else(synthetic_set):
    _, content = synthetic_set
    for image in content["images"]:
        scene = image["scene"]
        for sentence in image["sentences"]:
            words = _words(sentence["raw"])
            assert scene["color"] in words and scene["background"] in words
            assert [w for w in words if w in COLORS] == [scene["color"]]
            assert [w for w in words if w in BACKGROUNDS] == [scene["background"]]
            assert [w for w in words if w in SIZES] in ([], [scene["size"]])  # some captions leave size out
            nouns = [w for w in words if w in SHAPES or w in PLURALS.values()]
            assert nouns == [scene["shape"] if scene["count"] == 1 else PLURALS[scene["shape"]]]
            numbers = [w for w in words if w in NUMBER_WORDS.values()]
            assert numbers == ([] if scene["count"] == 1 else [NUMBER_WORDS[scene["count"]]])
            assert " a orange" not in f" {sentence['raw']}"  # articles agree


def test_read_caption_reads_back_every_generated_caption(synthetic_set):
    _, content = synthetic_set
    for image in content["images"]:
        scene = image["scene"]
        for sentence in image["sentences"]:
            stated = read_caption(sentence["raw"])
            expected = {name: scene[name] for name in ("color", "background", "shape", "count")}
            assert {name: stated[name] for name in expected} == expected
            assert stated["size"] in (None, scene["size"])


def test_attribute_accuracy_counts_what_each_caption_gets_right(synthetic_set, tmp_path):
    root, content = synthetic_set
    scenes = read_scenes(root / DATASET_FILE, "test")
    assert sorted(scenes) == [image["cocoid"] for image in content["images"] if image["split"] == "test"]
    truthful = {image_id: scene_captions(_scene(scene), random.Random(0))[0] for image_id, scene in scenes.items()}
    assert attribute_accuracy(scenes, truthful)["color"] == 1.0
    assert attribute_accuracy(scenes, truthful)["shape"] == 1.0
    nothing = {image_id: "a picture" for image_id in scenes}
    assert set(attribute_accuracy(scenes, nothing).values()) == {0.0}
    first_id = next(iter(scenes))
    one_wrong = truthful | {first_id: truthful[first_id].replace(scenes[first_id]["color"], "wrongcolor")}
    assert attribute_accuracy(scenes, one_wrong)["color"] == 1 - 1 / len(scenes)
    assert chance_levels() == {"color": 1 / 6, "background": 1 / 3, "size": 1 / 2, "count": 1 / 3, "shape": 1 / 3}


def _scene(recorded: dict) -> Scene:
    """A Scene from its JSON form (tuples became lists)."""
    return Scene(**recorded | {"centers": tuple(map(tuple, recorded["centers"])), "radii": tuple(recorded["radii"])})


def test_rendered_pixels_match_the_scene(synthetic_set):
    root, content = synthetic_set
    for image in content["images"]:
        scene = image["scene"]
        pixels = np.asarray(Image.open(root / image["filepath"] / image["filename"]), dtype=np.int16)
        background = np.array(BACKGROUNDS[scene["background"]])
        assert np.abs(pixels[0, 0] - background).max() <= 8  # a corner is background (JPEG noise aside)
        objects = np.abs(pixels - background).max(axis=2) > 60
        components = label(objects)
        sizes = np.bincount(components.ravel())[1:]
        # Objects are drawn apart: each is one blob; a few JPEG-ringing specks are not objects.
        assert (sizes > 40).sum() == scene["count"]
        object_pixels = pixels[components > 0]
        assert np.abs(np.median(object_pixels, axis=0) - np.array(COLORS[scene["color"]])).max() <= 30


def _drawn_area(shape: str, radius: float) -> int:
    scene = Scene(shape, "red", "small", 1, "white", ((112, 112),), (radius,))
    drawn = np.asarray(render_scene(scene, 224, random.Random(0)), dtype=np.int16)
    return int((np.abs(drawn - np.array(BACKGROUNDS["white"])).max(axis=2) > 60).sum())


def test_equal_area_shapes_leave_area_to_size_and_count():
    """At one radius every shape covers the same area, and three small objects never cover as much as a large one."""
    for radius in (15.0, 35.0):
        areas = [_drawn_area(shape, radius) for shape in SHAPES]
        assert max(areas) / min(areas) < 1.06
    largest_small = max(_drawn_area(shape, SIZES["small"][1] * 224) for shape in SHAPES)
    smallest_large = min(_drawn_area(shape, SIZES["large"][0] * 224) for shape in SHAPES)
    assert 3 * largest_small < smallest_large * 1.03  # pixel rounding aside


def test_scene_captions_are_varied_and_deterministic():
    scene = sample_scene(random.Random(3), 224)
    first, second = scene_captions(scene, random.Random(5)), scene_captions(scene, random.Random(5))
    assert first == second and len(set(first)) == 5


@pytest.mark.parametrize(
    ("sizes", "message"), [((-1, 1, 1), "--num_train must be >= 0"), ((0, 0, 0), "at least one image")]
)
def test_bad_sizes_are_one_line_errors(tmp_path, sizes, message):
    with pytest.raises(InputError, match=message):
        generate_dataset(tmp_path, num_train=sizes[0], num_val=sizes[1], num_test=sizes[2], progress=False)


def test_command_line_writes_the_set(tmp_path, capsys):
    from data import synthetic

    argv = ["--output_dir", str(tmp_path), "--num_train", "2", "--num_val", "1", "--num_test", "1", "--seed", "3"]
    path = synthetic.main(synthetic.parse_args(argv))
    assert path == tmp_path / DATASET_FILE and "wrote" in capsys.readouterr().out
    assert [len(read_annotations(path, split)) for split in ("train", "val", "test")] == [2, 1, 1]
