"""evaluate.py --clip_score: CLIP-S and RefCLIP-S in the table, overall and per image, in both modes
(--predictions and --checkpoint), from a parse_coco_clip.py file or from the images themselves."""

import json
from pathlib import Path

import pytest
import torch

import evaluate
import parse_coco_clip
import train
from data.annotations import read_annotations
from data.errors import InputError
from data.features import read_feature_file
from data.synthetic import generate_dataset
from models.clip_score import ClipScorer
from models.tiny import save_tiny_clip_model, save_tiny_gpt2, train_clip_tokenizer
from tests.conftest import TOKENIZER_TEXTS


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Four synthetic test images, a whole tiny CLIP (64-pixel crops), its image_embeds file, and predictions."""
    root = tmp_path_factory.mktemp("clip_score")
    dataset = generate_dataset(root / "synthetic", num_train=0, num_val=0, num_test=4, image_size=64, progress=False)
    records = read_annotations(dataset, "test")
    captions = [caption for record in records for caption in record.captions]
    clip = save_tiny_clip_model(root / "clip", captions, image_size=64, patch_size=16)
    features = root / "test.pkl"
    parse_coco_clip.main(
        parse_coco_clip.parse_args(
            ["--clip_model_type", str(clip), "--coco_images_dir", str(dataset.parent), "--captions_file", str(dataset)]
            + ["--split", "test", "--output_file", str(features), "--num_workers", "0", "--device", "cpu"]
        )
    )
    # A mixed bag: some predictions are references, one describes another image.
    predicted = {record.image_id: record.captions[0] for record in records}
    predicted[records[0].image_id] = records[1].captions[2]
    predictions = root / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": key, "caption": value} for key, value in predicted.items()]))
    gpt2 = save_tiny_gpt2(root / "gpt2", captions)
    return {
        "root": root,
        "dataset": dataset,
        "clip": clip,
        "features": features,
        "predictions": predictions,
        "gpt2": gpt2,
    }


def expected_scores(setup: dict, predictions: dict) -> dict:
    """CLIP-S and RefCLIP-S straight from the scorer on the feature file's image embeddings."""
    scorer = ClipScorer(str(setup["clip"]))
    feature_file = read_feature_file(setup["features"])
    references = {record.image_id: record.captions for record in read_annotations(setup["dataset"], "test")}
    ids = list(references)
    rows = feature_file.image_rows()
    clip_s, ref = scorer.scores(
        torch.stack([feature_file.embeddings[rows[i]] for i in ids]),
        [predictions[i] for i in ids],
        [references[i] for i in ids],
    )
    flat = {(i, "CLIP-S"): c for i, c in zip(ids, clip_s.tolist())}
    return flat | {(i, "RefCLIP-S"): r for i, r in zip(ids, ref.tolist())}


def by_image(report: dict) -> dict:
    """(image id, metric) -> score, flat: pytest.approx compares flat mappings only."""
    return {(entry["image_id"], key): entry[key] for entry in report["per_image"] for key in ("CLIP-S", "RefCLIP-S")}


@pytest.mark.parametrize("source", ["--clip_features", "--coco_images_dir"])
def test_predictions_mode_adds_clip_s_and_refclip_s(setup, tmp_path, capsys, source):
    value = str(setup["features"]) if source == "--clip_features" else str(setup["dataset"].parent)
    report = evaluate.main(
        evaluate.parse_args(
            ["--predictions", str(setup["predictions"]), "--references", str(setup["dataset"]), "--split", "test"]
            + ["--metrics", "CIDEr", "--clip_score", str(setup["clip"]), source, value, "--device", "cpu"]
            + ["--output", str(tmp_path / "metrics.json")]
        )
    )
    predictions = {entry["image_id"]: entry["caption"] for entry in json.loads(setup["predictions"].read_text())}
    expected = expected_scores(setup, predictions)
    assert by_image(report) == pytest.approx(expected, abs=1e-5)
    for key in ("CLIP-S", "RefCLIP-S"):
        mean = sum(value for (_, name), value in expected.items() if name == key) / 4
        assert report["scores"][key] == pytest.approx(mean, abs=1e-5)
    assert {"CIDEr", "CLIP-S", "RefCLIP-S"} <= report["scores"].keys()
    assert json.loads((tmp_path / "metrics.json").read_text())["scores"] == report["scores"]
    table = capsys.readouterr().out
    assert "CLIP-S " in table and "RefCLIP-S" in table


def test_checkpoint_mode_uses_the_features_when_they_are_the_models_image_embeds(setup, tmp_path):
    run = tmp_path / "run"
    train.main(
        train.parse_args(
            ["--data", str(setup["features"]), "--out_dir", str(run), "--gpt2", str(setup["gpt2"]), "--epochs", "1"]
            + ["--bs", "4", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
        )
    )
    report = evaluate.main(
        evaluate.parse_args(
            ["--checkpoint", str(run / "coco_prefix-000.pt"), "--features", str(setup["features"]), "--max_length", "8"]
            + ["--references", str(setup["dataset"]), "--split", "test", "--metrics", "CIDEr"]
            + ["--clip_score", str(setup["clip"]), "--device", "cpu"]
        )
    )
    predictions = {entry["image_id"]: entry["caption"] for entry in report["per_image"]}
    assert by_image(report) == pytest.approx(expected_scores(setup, predictions), abs=1e-5)


def test_clip_score_errors_are_one_line(setup, tiny_clip_dir):
    common = ["--predictions", str(setup["predictions"]), "--references", str(setup["dataset"]), "--split", "test"]
    common += ["--metrics", "CIDEr", "--device", "cpu"]
    with pytest.raises(InputError, match="give --clip_features .* or --coco_images_dir"):
        evaluate.main(evaluate.parse_args([*common, "--clip_score", str(setup["clip"])]))
    with pytest.raises(InputError, match="--clip_score needs a whole CLIP model with a text tower"):
        evaluate.main(evaluate.parse_args([*common, "--clip_score", str(tiny_clip_dir), "--clip_features", "x.pkl"]))


def test_the_tiny_clip_tokenizer_numbers_its_tokens_the_same_every_time():
    # The BPE trainer orders tokens of equal count by hash, so two trainings used to differ: the demo's
    # alignment then started from other embeddings each run, and its figures moved with them.
    vocabularies = [train_clip_tokenizer(TOKENIZER_TEXTS).get_vocab() for _ in range(5)]
    assert all(vocabulary == vocabularies[0] for vocabulary in vocabularies)
