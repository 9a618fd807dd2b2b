"""The demo: the whole pipeline, smaller, through the real scripts, learns more than the best
constant caption; and its bad-input paths are one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
from data.annotations import read_annotations
from data.errors import InputError
from data.features import FeatureFile, write_feature_file
from data.store import read_features
from data.synthetic import DATASET_FILE, generate_dataset
from stages.demo import (
    OUTPUT_NAMES,
    DemoOptions,
    DemoResult,
    alignment_command,
    format_comparison,
    most_common_caption,
    prepare_output_dir,
    stage_commands,
    write_constant_predictions,
)
from stages.demo_unpaired import ROUTES, write_halves

REPO = Path(__file__).resolve().parents[1]
# The demo at a fifth of its size: 600 training images, 6 short epochs, CIDEr only (METEOR's Java is slow).
SMALL_DEMO = [
    *("--num_train", "600", "--num_val", "30", "--num_test", "100"),
    *("--epochs", "6", "--eval_every", "6", "--bs", "16", "--warmup_steps", "20"),
    *("--metrics", "CIDEr", "--seed", "0"),
]


@pytest.mark.slow
def test_small_demo_learns_more_than_the_constant_caption(tmp_path, capsys):
    """Every stage runs as its script, alignment first; on held-out images CIDEr is at least 4x the constant
    caption's, and the aligned encoder lets the captions state shape well above chance (33%)."""
    output_dir = tmp_path / "demo"
    result = demo.main(demo.parse_args(["--output_dir", str(output_dir), *SMALL_DEMO]))
    printed = capsys.readouterr().out
    for script in ("train_clip.py", "parse_coco_clip.py", "train.py", "predict.py", "evaluate.py"):
        assert f"$ python {script}" in printed  # each stage's command is shown
    assert "--split test" in printed and "--val_data" in printed and "--sheet" in printed
    assert result.constant_scores["CIDEr"] > 0  # the baseline is a real caption that matches something
    assert result.model_scores["CIDEr"] >= 4 * result.constant_scores["CIDEr"], printed[-2000:]
    assert result.learned and "learned" in printed
    assert result.model_attributes["color"] > 0.8 and result.model_attributes["background"] > 0.9
    # What the random ViT could not see (it stayed at chance, 33%): 600 images are enough for well above
    # chance, not for the full demo's bars (shape >= 80%, count >= 90% with 3000; README has its figures).
    # Seen here: shape 0.48 (one thread) to 0.60 (two), count 0.89-0.90: the thread count changes the
    # rounding, and 600 images leave the outcome sensitive to it. A random encoder gives 0.33 +- 0.05 on
    # 100 test images, so 0.45 is well above it.
    assert result.model_attributes["shape"] > 0.45 and result.model_attributes["count"] > 0.7, result.model_attributes
    assert "--clip_model_type " + str(output_dir.resolve() / "align" / "encoder") in printed
    assert result.retrieval is not None and len(result.retrieval["epochs"]) == 30 and "R@sum" in printed
    assert result.sheet.is_file() and result.sheet.stat().st_size > 0
    predictions = json.loads((output_dir / "predictions" / "test.json").read_text())
    assert len(predictions) == 100 and len({p["caption"] for p in predictions}) > 1  # not one caption for all
    # SCST fine-tuned the model for CIDEr: greedy test CIDEr rose; predict.py captioned with the SCST model.
    assert "$ python train.py --scst --init_from" in printed and "SCST raised the greedy CIDEr" in printed
    assert result.scst_helped, result.scst_cider
    assert result.model_scores["CIDEr"] == pytest.approx(result.scst_cider["greedy after"], abs=1e-9)


def test_comparison_table_shows_both_and_the_verdict():
    scores = {"Bleu_4": 0.5, "CIDEr": 2.0}
    attributes = dict.fromkeys(("color", "background", "size", "count", "shape"), 0.5)
    result = DemoResult(scores, {"Bleu_4": 0.25, "CIDEr": 1.5}, "a red circle", attributes, attributes, Path("s.jpg"))
    table = format_comparison(result)
    assert "BLEU-4      50.00     25.00" in table and "CIDEr      200.00    150.00" in table
    assert "1.33 (the bar is 4x): NOT learned" in table and "s.jpg" in table
    assert not result.learned


def test_refuses_a_non_empty_output_dir_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty .*--overwrite"):
        demo.main(demo.parse_args(["--output_dir", str(tmp_path)]))
    for name in OUTPUT_NAMES[:3]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "old.txt").write_text("from an earlier demo")
    prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]  # only the demo's own outputs go


def test_refuses_a_file_as_output_dir(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a directory"):
        prepare_output_dir(tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("flag", ["--num_val", "--epochs", "--eval_every", "--bs"])
def test_rejects_sizes_below_one(tmp_path, flag):
    with pytest.raises(InputError, match=f"{flag} must be at least 1"):
        demo.main(demo.parse_args(["--output_dir", str(tmp_path / "out"), flag, "0"]))
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_a_failing_stage_is_one_line_naming_it(tmp_path):
    """Offline, --pretrained cannot load ViT-B/32 (the alignment's text tower): the demo stops at the first
    stage with one line, status 2."""
    completed = subprocess.run(
        [sys.executable, "demo.py", "--pretrained", "--output_dir", str(tmp_path / "out")]
        + ["--num_train", "2", "--num_val", "1", "--num_test", "1"],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr  # above the error line: only progress bars
    line = completed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: stage 'align' (train_clip.py) failed with exit status 2: ")
    assert "cannot load CLIP model 'ViT-B/32'" in line
    assert "$ python train_clip.py" in completed.stdout and "--text_encoder ViT-B/32" in completed.stdout
    assert "$ python parse_coco_clip.py" not in completed.stdout  # nothing runs after the failed stage


def _options(**changes) -> DemoOptions:
    args = demo.parse_args(["--output_dir", "out"])
    values = {name: getattr(args, name) for name in DemoOptions.__dataclass_fields__}
    return DemoOptions(**(values | changes))


def test_stage_commands_run_the_stages_in_order(tmp_path):
    paths = {name: tmp_path / name for name in ("synthetic", "features", "run", "cache", "predictions", "metrics")}
    paths |= {"sheet": tmp_path / "sheet.jpg", "checkpoint": tmp_path / "run" / "demo_best.pt"}
    paths["scst_checkpoint"] = tmp_path / "run" / "demo_scst_best.pt"
    without_scst = stage_commands(_options(pretrained=True, scst_epochs=0), paths, "ViT-B/32", "gpt2")
    scripts = [argv[0] for _, argv in without_scst]
    assert scripts == ["parse_coco_clip.py"] * 3 + ["train.py", "predict.py", "evaluate.py", "evaluate.py"]
    assert without_scst[4][1][without_scst[4][1].index("--checkpoint") + 1] == str(paths["checkpoint"])
    commands = stage_commands(_options(pretrained=True), paths, "ViT-B/32", "gpt2")
    scst = commands.pop(4)[1]  # after training: SCST from its best checkpoint, then the comparison at the end
    assert scst[:4] == ["train.py", "--scst", "--init_from", str(paths["checkpoint"])]
    comparison = commands[7:]
    assert [argv[argv.index("--checkpoint") + 1] for _, argv in comparison] == [str(paths["checkpoint"])] * 2 + [
        str(paths["scst_checkpoint"])
    ] * 2
    assert [argv[argv.index("--decode") + 1] for _, argv in comparison] == ["greedy", "beam"] * 2
    commands = commands[:7]
    assert commands[4][1][commands[4][1].index("--checkpoint") + 1] == str(paths["scst_checkpoint"])
    extraction = [dict(zip(argv[1::2], argv[2::2])) for _, argv in commands[:3]]
    assert [flags["--split"] for flags in extraction] == ["train", "val", "test"]
    assert all(flags["--clip_model_type"] == "ViT-B/32" for flags in extraction)
    training = commands[3][1]
    assert training[training.index("--lm") + 1] == "gpt2" and "--val_data" in training and "--eval_every" in training
    prediction = commands[4][1]
    assert prediction[1] == str(paths["synthetic"] / "test") and "--sheet" in prediction
    assert [argv[argv.index("--predictions") + 1] for _, argv in commands[5:7]] == [
        str(paths["predictions"] / "test.json"),
        str(paths["predictions"] / "constant.json"),
    ]


def test_alignment_runs_first_and_extraction_uses_its_encoder(tmp_path):
    paths = {
        name: tmp_path / name for name in ("synthetic", "align", "features", "run", "cache", "predictions", "metrics")
    }
    paths |= {"sheet": tmp_path / "sheet.jpg", "checkpoint": tmp_path / "run" / "demo_best.pt"}
    paths["scst_checkpoint"] = tmp_path / "run" / "demo_scst_best.pt"
    options = _options(align_epochs=3, align_image_size=64)
    alignment = alignment_command(options, paths, "tiny_cnn", str(tmp_path / "models" / "clip_text"))
    commands = stage_commands(options, paths, "unused-encoder", "gpt2", alignment)
    assert [name for name, _ in commands[:4]] == ["align", "extract train", "extract val", "extract test"]
    flags = {
        flag: value
        for flag, value in zip(alignment, alignment[1:])
        if flag.startswith("--") and not value.startswith("--")
    }
    assert alignment[0] == "train_clip.py" and "--train_text" not in alignment and "--cache_images" in alignment
    assert (flags["--split"], flags["--val_split"], flags["--epochs"], flags["--image_size"]) == (
        "train",
        "val",
        "3",
        "64",
    )
    assert flags["--out_dir"] == str(paths["align"]) and flags["--text_encoder"] == str(
        tmp_path / "models" / "clip_text"
    )
    for _, argv in commands[1:4]:
        assert argv[argv.index("--clip_model_type") + 1] == str(paths["align"] / "encoder")
    assert "--train_text" in alignment_command(_options(align_train_text=True), paths, "tiny_cnn", "t")


def test_constant_caption_is_the_most_common_training_caption(tmp_path):
    def image(number: int, split: str, captions: list[str]) -> dict:
        sentences = [{"raw": caption} for caption in captions]
        return {
            "filepath": split,
            "filename": f"{number:012d}.jpg",
            "cocoid": number,
            "split": split,
            "sentences": sentences,
        }

    dataset = tmp_path / DATASET_FILE
    images = [
        image(1, "train", ["a red circle", "two blue squares", "a red circle"]),
        image(2, "train", ["two blue squares", "two blue squares"]),
        # Test captions do not count, however common.
        image(3, "test", ["a red circle", "a red circle", "a red circle", "a red circle"]),
        image(4, "test", ["a green triangle"]),
    ]
    dataset.write_text(json.dumps({"images": images}))
    caption = most_common_caption(dataset)
    assert caption == "two blue squares"
    write_constant_predictions(dataset, caption, tmp_path / "constant.json")
    assert json.loads((tmp_path / "constant.json").read_text()) == [
        {"image_id": 3, "caption": "two blue squares"},
        {"image_id": 4, "caption": "two blue squares"},
    ]


# The --unpaired demo at its smallest: 200 training images, a short alignment, no SCST (131 s on the loaded 2-core
# CPU, much of it the start of 15 processes).
SMALL_UNPAIRED_DEMO = [
    *("--unpaired", "--num_train", "200", "--num_val", "20", "--num_test", "40", "--align_epochs", "3"),
    *("--epochs", "2", "--eval_every", "2", "--bs", "16", "--scst_epochs", "0", "--unpaired_epochs", "1"),
    *("--metrics", "CIDEr", "--seed", "0"),
]


@pytest.mark.slow
def test_small_unpaired_demo_prints_every_route_and_text_only_beats_the_constant(tmp_path, capsys):
    """Each route's line is printed with its number; the captioner that never saw a training image still beats
    the constant caption (seen: 99.8 against 43.9). Paired leading and unpaired beating text-only need the full
    demo's size (docs/demo.md), so they are not asserted here."""
    demo.main(demo.parse_args(["--output_dir", str(tmp_path / "demo"), *SMALL_UNPAIRED_DEMO]))
    printed = capsys.readouterr().out
    assert "$ python parse_corpus.py" in printed and "$ python train.py --unpaired --init_from" in printed
    assert "--text_memory" in printed and "--normalize_prefix --noise_std 0.126" in printed
    lines = printed.strip().splitlines()
    cider = {}
    for route in ROUTES:
        found = [line for line in lines if line.startswith(f"{route} test CIDEr ")]
        assert len(found) == 1, route
        cider[route] = float(found[0].removeprefix(f"{route} test CIDEr "))
    assert cider["text-only"] > cider["constant"] > 0, cider


def test_unpaired_needs_the_aligned_encoder(tmp_path):
    for flags in (["--align_epochs", "0"], ["--align_train_text"]):
        with pytest.raises(InputError, match="--unpaired needs the aligned encoder"):
            demo.main(demo.parse_args(["--output_dir", str(tmp_path / "out"), "--unpaired", *flags]))
    assert not (tmp_path / "out").exists()


def test_halves_split_images_from_captions(tmp_path):
    """--data gets the first half's image rows, --corpus the other half's captions: no image's captions in both."""
    dataset = generate_dataset(tmp_path / "set", num_train=6, num_val=1, num_test=1, seed=0)
    records = read_annotations(dataset, "train")
    captions = [{"image_id": r.image_id, "caption": c, "clip_embedding": row} for row, r in enumerate(records) for c in r.captions]
    embeddings = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)
    write_feature_file(tmp_path / "train.pkl", FeatureFile(embeddings, captions, {"num_images": 6}))
    assert write_halves(dataset, tmp_path / "train.pkl", tmp_path / "images.pkl", tmp_path / "corpus.txt") == (3, 3)
    images = read_features(tmp_path / "images.pkl")
    assert torch.equal(images.embeddings, embeddings[:3]) and images.meta["num_images"] == 3
    assert {c["image_id"] for c in images.captions} == {r.image_id for r in records[:3]}
    original_row = {record.image_id: row for row, record in enumerate(records)}
    for caption in images.captions:  # rows renumbered, each caption still on its own image's row
        assert torch.equal(images.embeddings[caption["clip_embedding"]], embeddings[original_row[caption["image_id"]]])
    corpus = (tmp_path / "corpus.txt").read_text().splitlines()
    assert corpus == [caption for record in records[3:] for caption in record.captions]
