"""export.py and train.py --export_hf with tiny models: an export captions as its checkpoint does (greedy
and beam, images and feature files), alone on "another machine" once the originals are gone; an
--only_prefix checkpoint exports the whole LM; the model card; refused outputs; pushing offline."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, GPT2Config, GPT2LMHeadModel

import evaluate
import export
import predict
import stages.export
import train
from data.errors import InputError
from data.features import FeatureFile, write_feature_file
from models.aligned import AlignedConfig, AlignedImageEncoder, save_aligned_encoder
from models.checkpoint import build_captioner, load_checkpoint, save_checkpoint
from models.config import CaptionerConfig
from models.encoders import load_encoder, save_encoder
from models.hf_export import MODEL_TYPE, WEIGHTS_FILE, load_captioner, load_export, save_export
from models.lm import load_lm
from models.tiny import save_tiny_clip_model, train_tokenizer
from stages.extract import iter_encoded_batches
from tests.conftest import REPO, TOKENIZER_TEXTS

CAPTIONS = [
    "a small red circle above a blue square",
    "two green triangles on a white background",
    "a large yellow star next to a black circle",
    "three purple squares in a row on a gray background",
]
GREEDY = ["--decode", "greedy", "--max_length", "8"]
BEAM = ["--decode", "beam", "--beam_size", "3", "--max_length", "8"]
TRAIN_FLAGS = ["--prefix_length", "4", "--bs", "4", "--warmup_steps", "1", "--lr", "3e-3", "--epochs", "2"]


def draw_images(directory: Path) -> list[Path]:
    """One drawn image per caption."""
    directory.mkdir()
    paths = []
    for number in range(len(CAPTIONS)):
        image = Image.new("RGB", (96 + 20 * number, 80), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill=(200, 30 + 60 * number, 40))
        paths.append(directory / f"image_{number}.png")
        image.save(paths[-1])
    return paths


def encoded_features(path: Path, encoder_dir: Path, images: list[Path]) -> Path:
    """A feature file of `images` by the encoder in `encoder_dir`, recorded in its meta, two captions each."""
    encoder, preprocess = load_encoder(str(encoder_dir))
    kwargs = {"batch_size": 8, "num_workers": 0, "device": torch.device("cpu"), "precision": "fp32", "progress": False}
    (batch,) = iter_encoded_batches(encoder, preprocess, images, **kwargs)
    captions = [
        {"image_id": row, "caption": text, "clip_embedding": row} for row, text in enumerate(CAPTIONS) for _ in range(2)
    ]
    write_feature_file(path, FeatureFile(batch.features, captions, {"encoder": encoder.spec.to_dict()}))
    return path


def random_features(path: Path, feature_dim: int = 16) -> Path:
    """A feature file without an encoder in its meta (as ClipCap's own files)."""
    embeddings = torch.randn(len(CAPTIONS), feature_dim, generator=torch.Generator().manual_seed(0))
    captions = [{"image_id": row, "caption": text, "clip_embedding": row} for row, text in enumerate(CAPTIONS)]
    write_feature_file(path, FeatureFile(embeddings, captions))
    return path


def train_run(data: Path, out_dir: Path, lm_dir: Path, *extra: str) -> None:
    cache = ["--cache_dir", str(out_dir.parent / "cache")]
    train.main(
        train.parse_args(
            ["--data", str(data), "--out_dir", str(out_dir), "--gpt2", str(lm_dir), *cache, *TRAIN_FLAGS, *extra]
        )
    )


def predicted(capsys, *args: str) -> list[str]:
    """predict.py's `id<TAB>caption` lines."""
    capsys.readouterr()
    predict.main(predict.parse_args([*args, "--device", "cpu", "--num_workers", "0"]))
    return capsys.readouterr().out.splitlines()


def evaluated(checkpoint: Path, features: Path) -> dict[str, float]:
    """evaluate.py's CIDEr and BLEU of the checkpoint's greedy captions of the feature file."""
    flags = ["--checkpoint", str(checkpoint), "--features", str(features), "--metrics", "Bleu", "CIDEr", *GREEDY]
    return evaluate.main(evaluate.parse_args([*flags, "--device", "cpu"]))["scores"]


def safetensors_state(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / WEIGHTS_FILE, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_an_export_captions_as_its_checkpoint_on_another_machine(tmp_path, tiny_gpt2_dir, tiny_clip_dir, capsys):
    # Copies of the tiny models, since this test deletes them to play the other machine.
    lm_dir = shutil.copytree(tiny_gpt2_dir, tmp_path / "lm")
    encoder_dir = shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    images = draw_images(tmp_path / "images")
    features = encoded_features(tmp_path / "features.pkl", encoder_dir, images)
    run = tmp_path / "run"
    train_run(features, run, lm_dir, "--val_data", str(features), "--eval_every", "1")
    checkpoint = run / "coco_prefix_best.pt"
    export_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(export_dir)]))

    # The directory a transformers user recognizes.
    assert {path.name for path in export_dir.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
        "README.md", "encoder",
    }  # fmt: skip
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["architectures"] == ["ClipCaptionModel"]
    assert config["lm_name"] == "." and config["lm_in_checkpoint"] and config["lm_config"]["model_type"] == "gpt2"
    assert config["encoder_bundled"] and config["encoder"]["name"] == "encoder/clip"
    spec = load_checkpoint(checkpoint).config.encoder
    processor = CLIPImageProcessor.from_pretrained(export_dir)
    assert processor.size == {"shortest_edge": spec["resize_dim"]}
    assert processor.crop_size == {"height": spec["crop_dim"], "width": spec["crop_dim"]}
    assert list(processor.image_mean) == spec["mean"] and list(processor.image_std) == spec["std"]
    # Every weight once: the tied output layer is the embedding matrix, restored as a tie on load.
    stored = safetensors_state(export_dir)
    original = load_checkpoint(checkpoint)
    assert set(stored) == set(original.state_dict()) - {"gpt.lm_head.weight"}
    loaded = load_captioner(export_dir)
    assert loaded.gpt.lm_head.weight is loaded.gpt.transformer.wte.weight
    assert all(torch.equal(tensor, loaded.state_dict()[name]) for name, tensor in original.state_dict().items())
    card = (export_dir / "README.md").read_text()
    scores = torch.load(checkpoint, weights_only=True)["scores"]
    assert f"| CIDEr | {100 * scores['CIDEr']:.2f} |" in card and f"| Bleu_4 | {100 * scores['Bleu_4']:.2f} |" in card
    assert "fine-tuned" in card and "bundled in `encoder/clip`" in card

    # The same captions from the checkpoint and from the export: feature file and images, greedy and beam.
    expected = {}
    for name, decoding in (("greedy", GREEDY), ("beam", BEAM)):
        from_checkpoint = predicted(capsys, "--features", str(features), "--checkpoint", str(checkpoint), *decoding)
        assert (
            predicted(capsys, "--features", str(features), "--checkpoint", str(export_dir), *decoding)
            == from_checkpoint
        )
        expected[name] = from_checkpoint
    from_images = predicted(capsys, *map(str, images), "--checkpoint", str(checkpoint), *BEAM)
    assert predicted(capsys, *map(str, images), "--checkpoint", str(export_dir), *BEAM) == from_images
    scored = evaluated(checkpoint, features)

    # Another machine: the export copied elsewhere, the checkpoint, LM, encoder and first export gone, offline.
    moved = shutil.copytree(export_dir, tmp_path / "elsewhere" / "captioner")
    for directory in (run, lm_dir, encoder_dir, export_dir):
        shutil.rmtree(directory)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "predict.py", *map(str, images), "--checkpoint", str(moved), "--device", "cpu"]
    result = subprocess.run(
        [*command, "--num_workers", "0", *BEAM], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == from_images
    assert "model of type" not in result.stderr  # transformers did not read the captioner's config as the LM's
    for name, decoding in (("greedy", GREEDY), ("beam", BEAM)):
        assert predicted(capsys, "--features", str(features), "--checkpoint", str(moved), *decoding) == expected[name]
    assert evaluated(moved, features) == scored  # evaluate.py --checkpoint takes the directory too


def test_an_only_prefix_checkpoint_exports_the_whole_lm(tmp_path, tiny_gpt2_dir):
    data = random_features(tmp_path / "features.pkl")
    train_run(data, tmp_path / "run", tiny_gpt2_dir, "--only_prefix", "--epochs", "1")
    checkpoint = tmp_path / "run" / "coco_prefix-000.pt"
    assert not any(name.startswith("gpt.") for name in torch.load(checkpoint, weights_only=True)["model"])
    export_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(export_dir)]))

    stored = safetensors_state(export_dir)
    lm = load_lm(str(tiny_gpt2_dir)).state_dict()
    lm_stored = {name.removeprefix("gpt."): tensor for name, tensor in stored.items() if name.startswith("gpt.")}
    assert set(lm_stored) == set(lm) - {"lm_head.weight"}
    assert all(torch.equal(tensor, lm[name]) for name, tensor in lm_stored.items())
    assert json.loads((export_dir / "config.json").read_text())["lm_in_checkpoint"] is True
    tokens = torch.tensor([[5, 9, 2]])
    features = torch.randn(1, 16)
    with torch.no_grad():
        expected = load_checkpoint(checkpoint)(features, tokens, torch.ones_like(tokens)).logits
        assert torch.equal(load_export(export_dir)(features, tokens, torch.ones_like(tokens)).logits, expected)
    card = (export_dir / "README.md").read_text()
    assert "frozen (`--only_prefix`" in card and "stores no evaluation scores" in card
    # No encoder recorded (a feature file without meta): no preprocessing to write, and the card says so.
    assert not (export_dir / "preprocessor_config.json").exists() and "caption feature files only" in card


@pytest.fixture
def checkpoint(tmp_path, tiny_gpt2_dir):
    """A checkpoint as train.py writes it, without scores or encoder."""
    torch.manual_seed(0)
    config = CaptionerConfig(feature_dim=16, prefix_length=4, lm_name=str(tiny_gpt2_dir))
    path = tmp_path / "model-000.pt"
    save_checkpoint(path, build_captioner(config), epoch=0)
    return path


def test_a_failed_export_leaves_the_earlier_one_whole(tmp_path, checkpoint, monkeypatch):
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    before = {path.name: path.read_bytes() for path in out_dir.iterdir() if path.is_file()}

    def disk_full(directory, model, tokenizer):
        (directory / "config.json").write_text("{}")  # half-written when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stages.export, "save_export", disk_full)
    with pytest.raises(InputError, match="cannot write \\(No space left on device\\); the previous one is unchanged"):
        export.main(export.parse_args([str(checkpoint), str(out_dir), "--overwrite"]))
    assert {path.name: path.read_bytes() for path in out_dir.iterdir() if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "model-000.pt"]  # no temporaries left


def test_outputs_that_exist_or_touch_an_input_are_refused(tmp_path, checkpoint, tiny_gpt2_dir):
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    first = (out_dir / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(InputError, match="already exists; give --overwrite"):
        export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    export.main(export.parse_args([str(checkpoint), str(out_dir), "--overwrite"]))  # an earlier export: replaced
    assert (out_dir / "model.safetensors").stat().st_mtime_ns != first
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "model-000.pt"]  # no temporaries left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an export"):  # --overwrite never deletes what is not an export
        export.main(export.parse_args([str(checkpoint), str(other), "--overwrite"]))
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="exists and is not a directory"):
        export.main(export.parse_args([str(checkpoint), str(checkpoint), "--overwrite"]))
    with pytest.raises(InputError, match="would hold or lie inside CHECKPOINT"):  # the export would hold its input
        export.main(export.parse_args([str(checkpoint), str(tmp_path), "--overwrite"]))
    with pytest.raises(InputError, match="would hold or lie inside the LM"):
        export.main(export.parse_args([str(checkpoint), str(tiny_gpt2_dir / "export")]))
    with pytest.raises(InputError, match="is a directory; export a checkpoint file"):
        export.main(export.parse_args([str(out_dir), str(tmp_path / "again")]))


def test_push_offline_is_one_line_and_keeps_the_export(tmp_path, checkpoint):
    out_dir = tmp_path / "export"
    environment = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    environment.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    command = [sys.executable, "export.py", str(checkpoint), str(out_dir), "--push_to_hub", "someone/captioner"]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: export kept at {out_dir}; push to someone/captioner failed: ")
    assert "offline mode is enabled" in error and "hf auth login" in error
    load_export(out_dir)  # whole and loadable
    # A malformed repository id fails before anything is written.
    with pytest.raises(InputError, match="not a hub repository id"):
        export.main(export.parse_args([str(checkpoint), str(tmp_path / "other"), "--push_to_hub", "a/b/c"]))
    assert not (tmp_path / "other").exists()


def test_train_export_hf_exports_the_final_checkpoint(tmp_path, tiny_gpt2_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the push cannot reach a network
    data = random_features(tmp_path / "features.pkl")
    out_dir = tmp_path / "hf"
    flags = ["--val_data", str(data), "--eval_every", "2", "--export_hf", str(out_dir)]
    with pytest.raises(InputError, match=f"export kept at {out_dir}; push to someone/captioner failed"):
        train_run(data, tmp_path / "run", tiny_gpt2_dir, *flags, "--push_to_hub", "someone/captioner")
    final = load_checkpoint(tmp_path / "run" / "coco_prefix-001.pt")
    exported = load_export(out_dir)
    assert all(torch.equal(tensor, exported.state_dict()[name]) for name, tensor in final.state_dict().items())
    # The final epoch was scored: its checkpoint keeps the scores, and the card shows them.
    scores = torch.load(tmp_path / "run" / "coco_prefix-001.pt", weights_only=True)["scores"]
    assert f"| CIDEr | {100 * scores['CIDEr']:.2f} |" in (out_dir / "README.md").read_text()

    # Checked at start: an existing directory is refused before any training.
    with pytest.raises(InputError, match="already exists; give --overwrite"):
        train_run(data, tmp_path / "second", tiny_gpt2_dir, "--export_hf", str(out_dir))
    assert not (tmp_path / "second").exists()
    with pytest.raises(InputError, match="would hold or lie inside the final checkpoint"):
        train_run(data, tmp_path / "third", tiny_gpt2_dir, "--export_hf", str(tmp_path / "third"))
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(data), "--push_to_hub", "someone/captioner"])


@pytest.mark.parametrize("lm_settings", [{"tie_word_embeddings": False}, {"add_cross_attention": True}])
def test_untied_and_cross_attention_lms_round_trip(tmp_path, lm_settings):
    """Generic in the LM: an untied output layer is stored, and a GPT-2 with cross-attention (--mapping_type
    xattn's) keeps its extra weights, from the config and the state dict alone."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TOKENIZER_TEXTS, 300)
    lm = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2, **lm_settings)
    )
    mapping_type = "xattn" if lm.config.add_cross_attention else "mlp"
    config = CaptionerConfig(feature_dim=8, prefix_length=2, mapping_type=mapping_type, lm_name="unused")
    model = build_captioner(config, lm).eval()
    save_export(tmp_path, model, tokenizer)
    stored = safetensors_state(tmp_path)
    assert ("gpt.lm_head.weight" in stored) == (not lm.config.tie_word_embeddings)
    if lm.config.add_cross_attention:
        assert any(".crossattention." in name for name in stored)
    loaded = load_export(tmp_path)
    assert all(torch.equal(tensor, loaded.state_dict()[name]) for name, tensor in model.state_dict().items())
    assert (loaded.gpt.lm_head.weight is loaded.gpt.transformer.wte.weight) == lm.config.tie_word_embeddings


def test_damaged_exports_are_one_line(tmp_path, checkpoint):
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    state = safetensors_state(out_dir)
    save_file({**state, "clip_project.model.0.weight": torch.zeros(3, 3)}, out_dir / WEIGHTS_FILE)
    with pytest.raises(InputError, match=r"model.safetensors: clip_project.model.0.weight has shape \(3, 3\)"):
        load_captioner(out_dir)
    save_file({name: tensor for name, tensor in state.items() if "wpe" not in name}, out_dir / WEIGHTS_FILE)
    with pytest.raises(InputError, match="1 missing"):
        load_captioner(out_dir)
    (out_dir / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="cannot read the weights"):
        load_captioner(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(InputError, match="export format 2; this version reads 1"):
        load_captioner(out_dir)
    (out_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match="not an export of this repo"):
        load_captioner(out_dir)
    with pytest.raises(InputError, match="not an export of this repo"):
        load_captioner(tmp_path)  # a directory without config.json


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feature_dim": "16"}, "'feature_dim' is '16', not a valid int"),
        ({"lm_in_checkpoint": "false"}, "'lm_in_checkpoint' is 'false', not a valid bool"),
        ({"encoder": [1, 2]}, "'encoder' is \\[1, 2\\], not a valid dict | None"),
        ({"encoder_bundled": "no"}, "'encoder_bundled' is 'no', not true or false"),
        ({"encoder_bundled": False, "encoder": {"name": "/etc"}}, "neither bundled nor a hub id"),
        ({"encoder_bundled": False, "encoder": {"name": "encoder/../../x"}}, "neither bundled nor a hub id"),
        ({"encoder_bundled": True, "encoder": {"name": "encoder/../../x"}}, "not a path inside the directory"),
        ({"encoder_bundled": True, "encoder": None}, "the encoder's name is None, not a string"),
        (
            {"encoder_bundled": False, "encoder": {"name": "org/clip", "mean": "x"}},
            "config.json: the encoder spec's 'mean' is 'x', not 3 numbers",
        ),
    ],
)
def test_an_untrusted_export_config_is_one_line(tmp_path, checkpoint, change, message):
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    config = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InputError, match=message):
        load_captioner(out_dir)


def test_a_config_declaring_more_lm_blocks_than_stored_is_refused_before_building(tmp_path, checkpoint, monkeypatch):
    """10^5 declared blocks would take minutes and gigabytes even on the meta device: the names tell first."""
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    config = json.loads((out_dir / "config.json").read_text())
    config["lm_config"]["n_layer"] = 100_000
    (out_dir / "config.json").write_text(json.dumps(config))
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["lm_config"]["n_layer"] = 100_000
    torch.save(saved, tmp_path / "claims.pt")
    built = []
    monkeypatch.setattr("models.checkpoint.lm_from_config", lambda *args: built.append(1))
    monkeypatch.setattr("models.hf_export.meta_captioner", lambda *args: built.append(1))
    for source in (out_dir, tmp_path / "claims.pt"):
        with pytest.raises(InputError, match="declares 100000 blocks, the weights hold 2"):
            load_captioner(source)
    assert not built


def aligned_encoder_dir(directory: Path) -> Path:
    """A train_clip.py-style encoder directory: a tiny CNN and its projection head, random weights."""
    torch.manual_seed(0)
    config = AlignedConfig(
        tower="tiny_cnn", tower_dim=32, projection_hidden=24, feature_dim=12, resize_dim=72, crop_dim=64,
        mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], tower_config={"channels": [8, 16], "stem": 4},
    )  # fmt: skip
    return save_aligned_encoder(directory, AlignedImageEncoder(config).eval())


FEATURE_ATOL = 1e-6  # rounding only: an address-dependent summation order in float32


@pytest.mark.parametrize("family", ["aligned", "dinov2", "whole_clip"])
def test_a_bundled_encoder_gives_the_features_of_the_original(tmp_path, family, tiny_dino_dir):
    if family == "aligned":
        original = aligned_encoder_dir(tmp_path / "encoder")
    elif family == "dinov2":
        original = tiny_dino_dir
    else:  # a whole CLIP (text tower too): the copy keeps the vision tower and projection
        original = save_tiny_clip_model(tmp_path / "clip", TOKENIZER_TEXTS, image_size=64, patch_size=16)
    encoder, preprocess = load_encoder(str(original))
    save_encoder(encoder, tmp_path / "bundled")
    copy, copy_preprocess = load_encoder(str(tmp_path / "bundled"))
    assert {**copy.spec.to_dict(), "name": None} == {**encoder.spec.to_dict(), "name": None}
    image = Image.new("RGB", (90, 70), (30, 160, 220))
    pixels = preprocess(image)[None]
    assert torch.equal(copy_preprocess(image)[None], pixels)
    # The copy is the original: every weight bit for bit, and the same features.
    copied_weights, original_weights = copy.model.state_dict(), encoder.model.state_dict()
    assert copied_weights.keys() == original_weights.keys()
    assert all(torch.equal(copied_weights[key], original_weights[key]) for key in original_weights)
    with torch.no_grad():
        features = encoder(pixels)
        # Not bit-exact: BLAS takes another kernel path for a weight at another address mod 16 (transformers
        # 5.25 leaves a whole CLIP's projection at the offset it has in the file), a difference of about 2e-7.
        torch.testing.assert_close(copy(pixels), features, rtol=0, atol=FEATURE_ATOL)
        # The tolerance still catches a real divergence: one weight moved by 1e-3.
        copy.model.state_dict()[next(iter(copied_weights))].view(-1)[0] += 1e-3
        assert (copy(pixels) - features).abs().max() > 10 * FEATURE_ATOL


def test_scst_starts_from_an_export_as_from_its_checkpoint(tmp_path, checkpoint):
    exported = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(exported)]))
    data = random_features(tmp_path / "train.pkl")
    weights = {}
    for name, source in (("pt", checkpoint), ("dir", exported)):
        out_dir = tmp_path / f"scst_{name}"
        args = ["--scst", "--init_from", str(source), "--data", str(data), "--out_dir", str(out_dir), "--prefix", "scst"]
        args += ["--cache_dir", str(tmp_path / "cache"), "--epochs", "1", "--bs", "4", "--lr", "1e-3", "--seed", "0"]
        args += ["--scst_samples", "2", "--max_length", "6"]
        train.main(train.parse_args(args))
        weights[name] = torch.load(out_dir / "scst-000.pt", weights_only=True)["model"]
    # The same starting weights and seed: the same fine-tuned weights (mapper and whole LM).
    assert weights["pt"].keys() == weights["dir"].keys()
    assert all(torch.allclose(weights["pt"][key], weights["dir"][key], atol=1e-6) for key in weights["pt"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_embd": -5}, "negative dimension"),
        ({"n_head": 0}, "division"),
        ({"n_embd": 10**9}, "overflowed"),
        ({"n_layer": "2"}, "expected int, got str"),
        ({"n_layer": 100_000.0}, "expected int, got float"),
        ({"model_type": "nope"}, "the LM config's model_type 'nope' is not a transformers model type"),
    ],
)
def test_an_unbuildable_lm_config_is_one_line(tmp_path, checkpoint, change, message):
    """Sizes that torch or transformers cannot build even on the meta device, a type it does not know: one line
    naming config.json (not the weights the layer count is checked against), not a traceback."""
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    config = json.loads((out_dir / "config.json").read_text())
    config["lm_config"].update(change)
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=f"config.json: (the config describes no buildable model: .*)?{message}"):
        load_captioner(out_dir)


def test_a_mapper_too_large_to_build_is_one_line(tmp_path, checkpoint):
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    config = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, "prefix_length": 10**9}))
    with pytest.raises(InputError, match="the config describes no buildable model: .*overflowed"):
        load_captioner(out_dir)


@pytest.mark.parametrize(
    "claim",
    [
        {"lm_config": {"num_hidden_layers": 100_000}},  # GPT-2's alias of n_layer, which the config takes
        {"lm_config": {"n_layer": 100_000}, "drop_lm_blocks": True},  # the weights hold no LM block to count
        {"num_layers": 100_000},  # the transformer mapper's layers
    ],
)
def test_claimed_layers_are_counted_against_the_weights_before_building(tmp_path, tiny_gpt2_dir, monkeypatch, claim):
    torch.manual_seed(0)
    config = CaptionerConfig(
        feature_dim=16, prefix_length=4, prefix_length_clip=2, mapping_type="transformer", num_layers=2,
        lm_name=str(tiny_gpt2_dir),
    )  # fmt: skip
    checkpoint = tmp_path / "model-000.pt"
    save_checkpoint(checkpoint, build_captioner(config))
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    values = json.loads((out_dir / "config.json").read_text())
    values["lm_config"].update(claim.get("lm_config", {}))
    values["num_layers"] = claim.get("num_layers", values["num_layers"])
    (out_dir / "config.json").write_text(json.dumps(values))
    if claim.get("drop_lm_blocks"):
        state = safetensors_state(out_dir)
        save_file({name: tensor for name, tensor in state.items() if ".h." not in name}, out_dir / WEIGHTS_FILE)
    built = []
    monkeypatch.setattr("models.checkpoint.lm_from_config", lambda *args: built.append(1))
    monkeypatch.setattr("models.hf_export.meta_captioner", lambda *args: built.append(1))
    stored = 0 if claim.get("drop_lm_blocks") else 2
    with pytest.raises(InputError, match=f"declares 100000 (blocks|mapper layers), the weights hold {stored}"):
        load_captioner(out_dir)
    assert not built


def test_an_export_whose_files_are_not_regular_files_is_one_line(tmp_path, checkpoint):
    """A FIFO blocks its reader forever: weights in a FIFO (predict.py), a target holding a FIFO config.json
    (export.py --overwrite). Subprocesses, so that a hang fails the test rather than stopping it."""
    out_dir = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(out_dir)]))
    (out_dir / WEIGHTS_FILE).unlink()
    os.mkfifo(out_dir / WEIGHTS_FILE)
    target = tmp_path / "target"
    target.mkdir()
    os.mkfifo(target / "config.json")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "model.safetensors: not a regular file": ["predict.py", "--features", str(random_features(tmp_path / "f.pkl"))]
        + ["--checkpoint", str(out_dir)],
        "exists and is not an export": ["export.py", str(checkpoint), str(target), "--overwrite"],
    }
    for message, command in commands.items():
        result = subprocess.run(
            [sys.executable, *command], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr
    assert (target / "config.json").exists()


def test_a_checkpoint_whose_encoder_spec_lacks_a_field_exports_in_one_line(tmp_path, checkpoint):
    """The preprocessor config and the model card show every field of the encoder spec: one missing is refused
    before anything is written, not a KeyError once the weights are."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["encoder"] = {
        "family": "clip", "name": "org/clip", "feature_type": "image_embeds", "resize_dim": 224, "crop_dim": 224,
        "std": [0.25, 0.25, 0.25], "feature_dim": 16,
    }  # fmt: skip
    torch.save(saved, tmp_path / "no_mean.pt")
    with pytest.raises(InputError, match="no_mean.pt: the encoder spec lacks mean$"):
        export.main(export.parse_args([str(tmp_path / "no_mean.pt"), str(tmp_path / "export")]))
    assert not (tmp_path / "export").exists()
