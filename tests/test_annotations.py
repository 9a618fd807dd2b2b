"""Annotation readers: the three formats, dedupe to one record per image, path resolution, bad files."""

import json
from pathlib import Path

import pytest

from data.annotations import ImageRecord, image_id_from_path, read_annotations
from data.errors import InputError


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


def karpathy_file(tmp_path: Path) -> Path:
    images = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test", "cocoid": 42},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg", "split": "train", "cocoid": 7},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000008.jpg", "split": "restval", "cocoid": 8},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000009.jpg", "split": "val", "cocoid": 9},
    ]
    for image in images:
        image["sentences"] = [{"raw": f"caption {k} of {image['cocoid']}", "tokens": []} for k in range(5)]
    return write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_clipcap_list_dedupes_to_one_record_per_image_in_first_appearance_order(tmp_path):
    entries = [{"image_id": image_id, "caption": f"{image_id}-{k}", "id": k} for k in range(5) for image_id in (3, 1)]
    entries.append({"image_id": "2", "caption": "a string id", "id": 99})  # ClipCap itself calls int() on ids
    records = read_annotations(write_json(tmp_path / "train_caption.json", entries))
    assert [record.image_id for record in records] == [3, 1, 2]
    assert records[0].captions == [f"3-{k}" for k in range(5)]
    assert records[0].file_path == "train2014/COCO_train2014_000000000003.jpg"  # no images_dir: ClipCap's first choice


def test_clipcap_list_resolves_train2014_else_val2014(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "train2014" / "COCO_train2014_000000000001.jpg").touch()
    entries = [{"image_id": 1, "caption": "in train"}, {"image_id": 2, "caption": "in val"}]
    records = read_annotations(write_json(tmp_path / "captions.json", entries), images_dir=tmp_path)
    assert [record.file_path for record in records] == [
        "train2014/COCO_train2014_000000000001.jpg",
        "val2014/COCO_val2014_000000000002.jpg",
    ]


def test_coco_captions_find_the_folder_holding_the_file(tmp_path):
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "COCO_val2014_000000000005.jpg").touch()
    (tmp_path / "flat.jpg").touch()
    content = {
        "images": [{"id": 5, "file_name": "COCO_val2014_000000000005.jpg"}, {"id": 6, "file_name": "flat.jpg"}],
        "annotations": [
            {"image_id": 6, "caption": "first seen", "id": 1},
            {"image_id": 5, "caption": "a", "id": 2},
            {"image_id": 6, "caption": "second", "id": 3},
        ],
    }
    records = read_annotations(write_json(tmp_path / "captions_val2014.json", content), images_dir=tmp_path)
    assert records == [
        ImageRecord(6, "flat.jpg", ["first seen", "second"]),
        ImageRecord(5, "val2014/COCO_val2014_000000000005.jpg", ["a"]),
    ]


@pytest.mark.parametrize(
    ("split", "expected_ids"),
    [("train", [7]), ("test", [42]), ("val", [9]), ("restval", [8]), ("train+restval", [7, 8])],
)
def test_karpathy_splits(tmp_path, split, expected_ids):
    records = read_annotations(karpathy_file(tmp_path), split=split)
    assert [record.image_id for record in records] == expected_ids
    assert all(len(record.captions) == 5 for record in records)
    assert records[0].file_path.endswith(f"{expected_ids[0]:012d}.jpg")
    assert records[0].file_path.split("/")[0] in ("train2014", "val2014")


def test_karpathy_flickr_ids_come_from_file_names_as_predict_names_images(tmp_path):
    images = [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "Two young guys."}]},
        {"filename": "1000268201_693b08cb0e.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "A child."}]},
        {"filename": "10002456.jpg", "split": "test", "sentences": [{"raw": "Workers."}, {"raw": "Men."}]},
    ]
    records = read_annotations(write_json(tmp_path / "dataset_flickr8k.json", {"images": images}), split="test")
    assert records == [
        ImageRecord(1000092795, "1000092795.jpg", ["Two young guys."]),
        ImageRecord("1000268201_693b08cb0e", "1000268201_693b08cb0e.jpg", ["A child."]),
        ImageRecord(10002456, "10002456.jpg", ["Workers.", "Men."]),
    ]
    # predict.py's --output ids for the same files, so its predictions meet these references.
    assert [image_id_from_path(f"images/{image['filename']}") for image in images] == [r.image_id for r in records]


@pytest.mark.parametrize(
    ("content", "split", "message"),
    [
        ("{not json", None, "not valid JSON"),
        ({"info": {}}, None, "unrecognized annotation format"),
        ([{"image_id": 1}], None, "entry 0: expected an object with 'image_id' and 'caption'"),
        ([{"image_id": 1.5, "caption": "x"}], None, "image_id 1.5 is not an integer"),
        ([{"image_id": 1, "caption": "x"}], "train", "this format has no splits"),
        ({"images": [], "annotations": [{"image_id": 3, "caption": "x"}]}, None, "image_id 3 is not in 'images'"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}, None, "needs a split"),
        ({"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}, "training", "got split 'training'"),
        ([], None, "no captioned images"),
    ],
)
def test_bad_annotation_files_are_one_line_input_errors(tmp_path, content, split, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputError, match=message) as error:
        read_annotations(path, split=split)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(InputError, match="no such annotation file"):
        read_annotations(tmp_path / "absent.json")
    with pytest.raises(InputError, match=f"{tmp_path}: cannot read this annotation file"):
        read_annotations(tmp_path)  # a directory
