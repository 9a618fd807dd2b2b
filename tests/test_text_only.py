"""Text-only captioning (CapDec, DeCap) through the real scripts on the tiny whole CLIP and GPT-2: parse_corpus.py,
train.py on text embeddings with --noise_std, predict.py / evaluate.py on images, and --text_memory."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel

import evaluate
import parse_coco_clip
import parse_corpus
import predict
import train
from data.annotations import read_annotations
from data.errors import InputError
from data.features import FeatureFile
from data.store import read_features
from models.aligned import AlignedConfig, AlignedImageEncoder, save_aligned_encoder
from models.checkpoint import captioner_tokenizer
from models.clip_score import clip_name, holds_image_embeds_of
from models.decoding import DecodingOptions, caption_features
from models.encoders import load_encoder
from models.hf_export import load_captioner
from models.text_memory import TextMemory
from models.tiny import save_tiny_clip_model
from stages.cross_entropy import capdec_noise, step_generator
from stages.train import Trainer
from tests.conftest import REPO
from tests.test_training import crash_at_step, read_log


def embed_corpus(corpus: Path, clip: Path, output: Path, *extra: str) -> Path:
    """parse_corpus.py on `corpus` with the tiny CLIP, in 3-sentence batches."""
    argv = ["--corpus", str(corpus), "--clip_model_type", str(clip), "--output_file", str(output)]
    parse_corpus.main(parse_corpus.parse_args([*argv, "--batch_size", "3", "--device", "cpu", *extra]))
    return output


def text_tower(clip: Path, sentences: list[str]) -> torch.Tensor:
    """CLIPModel's own projected text features, one sentence at a time (no padding), (N, D)."""
    model, tokenizer = CLIPModel.from_pretrained(clip).eval(), AutoTokenizer.from_pretrained(clip)
    with torch.no_grad():
        return torch.cat(
            [model.get_text_features(**tokenizer([text], return_tensors="pt")).pooler_output for text in sentences]
        )


def decap(features: torch.Tensor, corpus: torch.Tensor, temperature: float) -> torch.Tensor:
    """DeCap's formula as written: v' = sum_j softmax(tau * v.s_j) s_j over normalized v and s_j."""
    rows = F.normalize(corpus, dim=-1)
    return torch.softmax(temperature * F.normalize(features, dim=-1) @ rows.T, dim=-1) @ rows


@pytest.fixture(scope="module")
def setup(synthetic, tmp_path_factory) -> dict:
    """The synthetic training captions as a corpus, the test images' CLIP features, a text-only captioner."""
    root = tmp_path_factory.mktemp("text_only")
    corpus = embed_corpus(synthetic["dataset"], synthetic["clip"], root / "corpus.pkl", "--split", "train")
    images = root / "test_images.pkl"
    parse_coco_clip.main(
        parse_coco_clip.parse_args(
            ["--clip_model_type", str(synthetic["clip"]), "--coco_images_dir", str(synthetic["images"])]
            + ["--captions_file", str(synthetic["dataset"]), "--split", "test", "--output_file", str(images)]
            + ["--num_workers", "0", "--device", "cpu"]
        )
    )
    out_dir = root / "run"
    argv = ["--data", str(corpus), "--out_dir", str(out_dir), "--prefix", "text", "--gpt2", str(synthetic["gpt2"])]
    argv += ["--cache_dir", str(root / "cache"), "--prefix_length", "4", "--bs", "8", "--epochs", "6", "--lr", "1e-2"]
    train.main(train.parse_args([*argv, "--warmup_steps", "2", "--normalize_prefix", "--noise_std", "0.126"]))
    return {"root": root, "corpus": corpus, "images": images, "run": out_dir, "checkpoint": out_dir / "text-005.pt"}


CORPUS_SENTENCES = ["a red circle", "two blue squares", "a green triangle"]


def write_corpus(kind: str, directory: Path) -> tuple[Path, list[str]]:
    """The corpus of one input format, and the sentences parse_corpus.py should embed, in order."""
    if kind == "text":
        (path := directory / "corpus.txt").write_text("\n".join(CORPUS_SENTENCES) + "\n")
    elif kind == "json":
        (path := directory / "corpus.json").write_text(json.dumps(CORPUS_SENTENCES))
    elif kind == "clipcap":
        entries = [{"image_id": row, "caption": text} for row, text in enumerate(CORPUS_SENTENCES)]
        (path := directory / "captions.json").write_text(json.dumps(entries))
    elif kind == "coco":
        images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
        annotations = [{"image_id": 1 + row // 2, "caption": text} for row, text in enumerate(CORPUS_SENTENCES)]
        (path := directory / "captions").write_text(json.dumps({"images": images, "annotations": annotations}))
    else:  # parquet, with another column beside the sentences
        path = directory / "corpus.parquet"
        pq.write_table(pa.table({"id": [7, 8, 9], "text": CORPUS_SENTENCES}), path)
    return path, CORPUS_SENTENCES


@pytest.mark.parametrize("kind", ["text", "json", "clipcap", "coco", "parquet"])
def test_parse_corpus_embeds_as_the_clip_text_tower(kind, synthetic, tmp_path):
    corpus, sentences = write_corpus(kind, tmp_path)
    extra = ("--parquet_column", "text") if kind == "parquet" else ()
    features = read_features(embed_corpus(corpus, synthetic["clip"], tmp_path / "out.pkl", *extra))
    assert [caption["caption"] for caption in features.captions] == sentences
    assert [(c["image_id"], c["clip_embedding"]) for c in features.captions] == [(row, row) for row in range(3)]
    torch.testing.assert_close(features.embeddings, text_tower(synthetic["clip"], sentences), rtol=1e-5, atol=1e-5)
    assert features.meta["modality"] == "text" and features.modality == "text"


def test_karpathy_corpus_and_store_match_and_record_the_image_encoder(synthetic, setup, tmp_path):
    sentences = [caption for record in read_annotations(synthetic["dataset"], "train") for caption in record.captions]
    unique = list(dict.fromkeys(sentence.strip() for sentence in sentences))
    corpus = read_features(setup["corpus"])
    assert [caption["caption"] for caption in corpus.captions] == unique
    store = read_features(embed_corpus(synthetic["dataset"], synthetic["clip"], tmp_path / "store", "--split", "train",
                                       "--output_format", "shards"))  # fmt: skip
    assert torch.equal(store.embeddings[:], corpus.embeddings)
    assert store.modality == "text" and list(store.captions) == corpus.captions
    # The image features of the same CLIP record the same encoder: a captioner of one takes the other.
    assert corpus.meta["encoder"] == read_features(setup["images"]).meta["encoder"]


def test_bad_lines_are_skipped_and_counted_in_one_line(synthetic, tmp_path, capsys):
    lines = [b"a red circle", b"", b"   ", "x" * 30, b"a red circle", b"\xff\xfe not utf-8", b" two blue squares "]
    (corpus := tmp_path / "corpus.txt").write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines)
    )
    features = read_features(embed_corpus(corpus, synthetic["clip"], tmp_path / "out.pkl", "--max_caption_chars", "20"))
    assert [caption["caption"] for caption in features.captions] == ["a red circle", "two blue squares"]
    assert features.meta["skipped"] == {"empty": 2, "too long": 1, "not UTF-8": 1}
    assert features.meta["num_duplicates"] == 1
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--corpus")]
    assert report == [
        f"--corpus {corpus}: 2 sentences (text), 1 duplicates dropped, 4 skipped (2 empty, 1 too long, 1 not UTF-8)"
    ]


def test_parse_corpus_refusals_are_one_line(synthetic, tmp_path):
    corpus, _ = write_corpus("text", tmp_path)
    cases = [
        (corpus, ()),  # its own input as the output
        (tmp_path / "out.pkl", ("--parquet_column", "text")),  # not a parquet file
    ]
    for output, extra in cases:
        with pytest.raises(InputError) as error:
            embed_corpus(corpus, synthetic["clip"], output, *extra)
        assert "\n" not in str(error.value)
    parquet, _ = write_corpus("parquet", tmp_path)
    with pytest.raises(InputError, match="no column 'caption'"):
        embed_corpus(parquet, synthetic["clip"], tmp_path / "out.pkl", "--parquet_column", "caption")
    assert corpus.read_text().splitlines() == CORPUS_SENTENCES  # untouched


@pytest.mark.parametrize("std", [0.01, 0.126])
def test_capdec_noise_has_the_stated_std(std):
    # x' = normalize(n + e) with n = normalize(x): r x' = n + e, so e's part across n over its part along n is
    # x's: |x'_perp| / (x'.n) = |e_perp| / (1 + e.n), whose square is (D - 1) std^2 (1 + 3 std^2) on average.
    rows, dim = 4000, 512
    features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(1)) * 3
    noisy = capdec_noise(features, std, step_generator(0, 0, 0))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(rows))
    unit = F.normalize(features, dim=-1)
    along = (noisy * unit).sum(-1)
    across = (noisy - along[:, None] * unit).norm(dim=-1)
    measured = math.sqrt(((across / along) ** 2).mean().item() / ((dim - 1) * (1 + 3 * std**2)))
    assert measured == pytest.approx(std, rel=0.02)
    # One generator per (seed, rank, step): the same step draws the same noise, another step another.
    assert torch.equal(noisy, capdec_noise(features, std, step_generator(0, 0, 0)))
    assert not torch.equal(noisy, capdec_noise(features, std, step_generator(0, 0, 1)))


def test_text_only_training_learns_and_captions_images(synthetic, setup, capsys, tmp_path):
    losses = [record["loss"] for record in read_log(setup["run"], "text") if "loss" in record]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    model = load_captioner(setup["checkpoint"])
    assert model.config.encoder == read_features(setup["images"]).meta["encoder"]  # the CLIP's vision tower
    assert model.config.normalize_prefix
    image = sorted((synthetic["images"] / "test").glob("*.jpg"))[0]
    predictions = tmp_path / "preds.json"
    predict.main(predict.parse_args([str(image), "--checkpoint", str(setup["checkpoint"]), "--output", str(predictions),
                                     "--device", "cpu", "--num_workers", "0"]))  # fmt: skip
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(image))]
    assert len(printed) == 1 and printed[0].split("\t")[1].strip()
    assert json.loads(predictions.read_text())[0]["caption"] == printed[0].split("\t")[1]
    report = evaluate.main(evaluate.parse_args(["--checkpoint", str(setup["checkpoint"]), "--features",
                                                str(setup["images"]), "--metrics", "Bleu", "CIDEr", "--device", "cpu"]))  # fmt: skip
    assert report["settings"]["image_count"] == 4 and math.isfinite(report["scores"]["CIDEr"])


def test_text_only_training_without_normalized_features_is_refused(synthetic, setup, tmp_path):
    argv = ["--data", str(setup["corpus"]), "--out_dir", str(tmp_path), "--gpt2", str(synthetic["gpt2"])]
    with pytest.raises(InputError, match="give --normalize_prefix"):
        train.main(train.parse_args(argv))


def test_noisy_training_resumes_exactly(synthetic, setup, tmp_path, monkeypatch):
    common = ["--data", str(setup["corpus"]), "--gpt2", str(synthetic["gpt2"]), "--cache_dir", str(tmp_path / "cache")]
    common += ["--prefix_length", "2", "--bs", "16", "--epochs", "2", "--save_latest_every", "1", "--only_prefix"]
    common += ["--normalize_prefix", "--noise_std", "0.126", "--warmup_steps", "1"]
    train.main(train.parse_args([*common, "--out_dir", str(tmp_path / "straight")]))
    steps = len(read_log(tmp_path / "straight"))
    crash_at_step(monkeypatch, Trainer, steps - 1, [*common, "--out_dir", str(tmp_path / "resumed")])
    train.main(
        train.parse_args([*common, "--out_dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "resumed")])
    )
    assert [r["loss"] for r in read_log(tmp_path / "resumed")] == [r["loss"] for r in read_log(tmp_path / "straight")]
    noiseless = tmp_path / "noiseless"
    train.main(
        train.parse_args([*[a for a in common if a not in ("--noise_std", "0.126")], "--out_dir", str(noiseless)])
    )
    assert [r["loss"] for r in read_log(noiseless)] != [r["loss"] for r in read_log(tmp_path / "straight")]


def test_decap_projection_equals_the_formula():
    generator = torch.Generator().manual_seed(0)
    corpus, features = torch.randn(50, 16, generator=generator) * 4, torch.randn(6, 16, generator=generator)
    expected = decap(features, corpus, 100.0)
    for chunk_rows in (50, 7, 1):  # one pass, or an online softmax over chunks
        torch.testing.assert_close(TextMemory(corpus, 100.0, chunk_rows).project(features), expected)
    torch.testing.assert_close(
        TextMemory(corpus, 1e4, 7).project(features), decap(features, corpus, 1e4)
    )  # no overflow


def test_text_memory_projects_what_predict_and_evaluate_caption(setup, tmp_path):
    checkpoint, images, corpus = (str(setup[key]) for key in ("checkpoint", "images", "corpus"))
    predictions = tmp_path / "preds.json"
    predict.main(predict.parse_args(["--features", images, "--checkpoint", checkpoint, "--text_memory", corpus,
                                     "--memory_temperature", "30", "--output", str(predictions), "--device", "cpu"]))  # fmt: skip
    image_file, corpus_file = read_features(images), read_features(corpus)
    rows = image_file.image_rows()
    projected = decap(image_file.embeddings[list(rows.values())], corpus_file.embeddings, 30.0)
    model = load_captioner(checkpoint)
    expected = caption_features(model, captioner_tokenizer(model), projected, DecodingOptions())
    assert [entry["caption"] for entry in json.loads(predictions.read_text())] == [group[0] for group in expected]
    report = evaluate.main(evaluate.parse_args(["--checkpoint", checkpoint, "--features", images, "--text_memory",
                                                corpus, "--memory_temperature", "30", "--metrics", "Bleu", "--device", "cpu"]))  # fmt: skip
    assert [entry["caption"] for entry in report["per_image"]] == [group[0] for group in expected]
    assert report["settings"]["memory_temperature"] == 30.0


def test_memory_of_images_or_of_another_clip_is_refused_in_one_line(synthetic, setup, tmp_path):
    checkpoint, images = str(setup["checkpoint"]), str(setup["images"])
    captions = [caption for record in read_annotations(synthetic["dataset"], "train") for caption in record.captions]
    other_clip = save_tiny_clip_model(tmp_path / "other_clip", captions, image_size=32, patch_size=16,
                                      projection_dim=16, seed=1)  # fmt: skip
    other = embed_corpus(synthetic["dataset"], other_clip, tmp_path / "other.pkl", "--split", "train")
    for memory, message in ((images, "holds image features"), (other, "holds features of clip")):
        argv = ["--features", images, "--checkpoint", checkpoint, "--text_memory", str(memory), "--device", "cpu"]
        with pytest.raises(InputError, match=message) as error:
            predict.main(predict.parse_args(argv))
        assert "\n" not in str(error.value)
    result = subprocess.run(
        [sys.executable, "predict.py", "--features", images, "--checkpoint", checkpoint, "--text_memory", images],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --text_memory {images}: holds image features, not a corpus's text embeddings (parse_corpus.py)"
    )


def test_a_corpus_given_as_image_features_is_refused_in_one_line(setup):
    corpus, checkpoint = str(setup["corpus"]), str(setup["checkpoint"])
    message = f"{corpus}: holds text features, not image features; a corpus belongs in --text_memory"
    with pytest.raises(InputError) as error:
        predict.main(predict.parse_args(["--features", corpus, "--checkpoint", checkpoint, "--device", "cpu"]))
    assert str(error.value) == message
    with pytest.raises(InputError, match="holds text features, not image features"):
        evaluate.main(evaluate.parse_args(["--checkpoint", checkpoint, "--features", corpus, "--device", "cpu"]))


def aligned_to(clip: Path, directory: Path, text_space: str | None) -> Path:
    """A train_clip.py-style encoder (tiny CNN, random weights) of `clip`'s text width, recording `text_space`."""
    width = CLIPModel.from_pretrained(clip).config.projection_dim
    config = AlignedConfig(
        tower="tiny_cnn", tower_dim=16, projection_hidden=16, feature_dim=width, resize_dim=32, crop_dim=32,
        mean=[0.5] * 3, std=[0.25] * 3, tower_config={"channels": [8, 16], "stem": 4}, source={"text_space": text_space},
    )  # fmt: skip
    return save_aligned_encoder(directory, AlignedImageEncoder(config).eval())


def test_an_aligned_image_encoder_stands_in_for_the_clips_vision_tower(synthetic, setup, tmp_path):
    """--image_encoder: the same text embeddings, the meta naming the aligned encoder (so its features are what a
    captioner trained on the corpus takes, and CLIP rewards of --clip_model take them as its image side)."""
    clip = synthetic["clip"]
    encoder = aligned_to(clip, tmp_path / "encoder", clip_name(str(clip)))
    corpus = read_features(embed_corpus(synthetic["dataset"], clip, tmp_path / "corpus.pkl", "--split", "train",
                                        "--image_encoder", str(encoder)))  # fmt: skip
    assert torch.equal(corpus.embeddings, read_features(setup["corpus"]).embeddings)
    assert corpus.meta["encoder"] == load_encoder(str(encoder))[0].spec.to_dict()
    assert corpus.meta["clip_model"] == clip_name(str(clip))
    aligned_images = FeatureFile(torch.zeros(1, 4), [], {"encoder": corpus.meta["encoder"]})
    assert holds_image_embeds_of(aligned_images, clip_name(str(clip)))
    assert not holds_image_embeds_of(aligned_images, "openai/clip-vit-base-patch32")
    for space in (None, "openai/clip-vit-base-patch32"):  # a trained text tower's, or another CLIP's
        other = aligned_to(clip, tmp_path / f"other_{space is None}", space)
        with pytest.raises(InputError, match=f"--image_encoder {other}: aligned to .*not to the frozen text tower"):
            embed_corpus(synthetic["dataset"], clip, tmp_path / "refused.pkl", "--split", "train", "--image_encoder", str(other))
    assert not (tmp_path / "refused.pkl").exists()
