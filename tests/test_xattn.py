"""--mapping_type xattn: a GPT-2 with cross-attention layers over projected patch tokens, through
train.py, predict.py and evaluate.py on tiny models; its checkpoints keep the cross-attention layers."""

import json

import pytest
import torch

import evaluate
import export
import parse_coco_clip
import predict
import train
from data.errors import InputError
from data.features import FeatureFile, write_feature_file
from data.store import read_features
from models.checkpoint import load_checkpoint, read_checkpoint
from models.decoding import DecodingOptions, caption_features
from models.hf_export import load_captioner
from models.lm import is_cross_attention_weight, load_lm, load_tokenizer
from stages.train import Trainer
from tests.test_extraction import write_image
from tests.test_patch_tokens import folder_args
from tests.test_scst import scst_args
from tests.test_training import CAPTIONS, crash_at_step, read_log

FEATURE_DIM, NUM_TOKENS = 16, 5


def write_patch_tokens(path, captions_per_image, seed=0, shape=None):
    """A feature file with patch tokens (N, T, D) per image, as --feature_type patch_tokens writes."""
    shape = shape or (len(captions_per_image), NUM_TOKENS, FEATURE_DIM)
    embeddings = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    captions = [
        {"image_id": row, "caption": text, "clip_embedding": row}
        for row, texts in enumerate(captions_per_image)
        for text in texts
    ]
    meta = {"feature_dim": shape[-1], "split": "test"}
    write_feature_file(path, FeatureFile(embeddings, captions, meta))
    return path


def xattn_args(data, out_dir, lm_dir, *extra):
    return [
        "--data", str(data), "--out_dir", str(out_dir), "--gpt2", str(lm_dir), "--cache_dir", str(out_dir.parent / "cache"),
        "--mapping_type", "xattn", "--bs", "8", "--warmup_steps", "2", "--lr", "1e-2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gpt2_dir):
    """An xattn run (LM fine-tuned) on eight images, each with its own caption."""
    root = tmp_path_factory.mktemp("xattn")
    data = write_patch_tokens(root / "train.pkl", [[text] * 4 for text in CAPTIONS])
    out_dir = root / "run"
    train.main(train.parse_args(xattn_args(data, out_dir, tiny_gpt2_dir, "--epochs", "16", "--save_every", "100")))
    return data, out_dir


def test_xattn_learns_to_caption_its_images(trained, tiny_gpt2_dir):
    data, out_dir = trained
    losses = [record["loss"] for record in read_log(out_dir) if "loss" in record]
    assert sum(losses[-4:]) / 4 < 0.1 * losses[0]
    model = load_checkpoint(out_dir / "coco_prefix-015.pt")
    assert model.config.mapping_type == "xattn" and model.config.prefix_length == 1
    tokens = read_features(data).embeddings  # (8, T, D)
    captions = caption_features(model, load_tokenizer(str(tiny_gpt2_dir)), tokens, DecodingOptions(method="greedy"))
    # Each image gets its own caption back: the patch tokens, through cross-attention, carry the image.
    assert [caption[0] for caption in captions] == [" ".join(text.split()) for text in CAPTIONS]


def test_only_prefix_trains_the_new_layers_keeps_them_and_resumes_exactly(tmp_path, tiny_gpt2_dir, monkeypatch):
    data = write_patch_tokens(tmp_path / "train.pkl", [[text] * 2 for text in CAPTIONS])  # 4 steps an epoch
    common = ("--epochs", "2", "--save_latest_every", "2", "--only_prefix", "--bs", "4")
    straight = tmp_path / "straight"
    train.main(train.parse_args(xattn_args(data, straight, tiny_gpt2_dir, *common)))
    losses = [record["loss"] for record in read_log(straight) if "loss" in record]
    assert sum(losses[-2:]) < sum(losses[:2])

    state = read_checkpoint(straight / "coco_prefix-001.pt")["model"]
    lm_keys = [name for name in state if name.startswith("gpt.")]
    assert lm_keys and all(is_cross_attention_weight(name) for name in lm_keys)
    assert any(name.startswith("clip_project.") for name in state)
    # The LM's own weights did not move: they equal the pretrained ones the checkpoint names.
    model = load_checkpoint(straight / "coco_prefix-001.pt")
    pristine = load_lm(str(tiny_gpt2_dir)).state_dict()
    for name, tensor in model.gpt.state_dict().items():
        if name in pristine:
            assert torch.equal(tensor, pristine[name]), name

    interrupted = tmp_path / "interrupted"
    crash_at_step(monkeypatch, Trainer, 6, xattn_args(data, interrupted, tiny_gpt2_dir, *common))
    train.main(train.parse_args(xattn_args(data, interrupted, tiny_gpt2_dir, *common, "--resume", str(interrupted))))
    expected = read_checkpoint(straight / "coco_prefix-001.pt")["model"]
    resumed = read_checkpoint(interrupted / "coco_prefix-001.pt")["model"]
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_a_checkpoint_without_its_cross_attention_is_refused(trained, tmp_path):
    _, out_dir = trained
    checkpoint = read_checkpoint(out_dir / "coco_prefix-015.pt")
    assert any(name.startswith("gpt.") and not is_cross_attention_weight(name) for name in checkpoint["model"])
    checkpoint["model"] = {name: t for name, t in checkpoint["model"].items() if not is_cross_attention_weight(name)}
    stripped = tmp_path / "stripped.pt"
    torch.save(checkpoint, stripped)
    with pytest.raises(InputError, match="missing .*crossattention"):
        load_checkpoint(stripped)


def test_predict_and_evaluate_rebuild_it_from_the_file_alone(trained, tmp_path, capsys):
    data, out_dir = trained
    checkpoint = out_dir / "coco_prefix-015.pt"
    output = tmp_path / "preds.json"
    predict.main(predict.parse_args(["--features", str(data), "--checkpoint", str(checkpoint), "--output", str(output)]))
    predictions = json.loads(output.read_text())
    assert len(predictions) == len(CAPTIONS)
    metrics = evaluate.main(
        evaluate.parse_args(
            ["--checkpoint", str(checkpoint), "--features", str(data), "--decode", "greedy",
             "--metrics", "Bleu", "CIDEr", "--device", "cpu", "--output", str(tmp_path / "metrics.json")]
        )  # fmt: skip
    )
    assert metrics["scores"]["CIDEr"] > 1.0  # it learned the captions of these very images


def test_features_and_mapping_type_must_agree(tmp_path, tiny_gpt2_dir, capsys):
    patch_tokens = write_patch_tokens(tmp_path / "tokens.pkl", [["a red circle"]] * 4)
    pooled = write_patch_tokens(tmp_path / "pooled.pkl", [["a red circle"]] * 4, shape=(4, FEATURE_DIM))
    with pytest.raises(InputError, match="patch_tokens"):
        train.main(train.parse_args(xattn_args(pooled, tmp_path / "a", tiny_gpt2_dir, "--epochs", "1")))
    args = xattn_args(patch_tokens, tmp_path / "b", tiny_gpt2_dir, "--epochs", "1")
    args[args.index("xattn")] = "mlp"
    with pytest.raises(InputError, match="use --mapping_type xattn"):
        train.main(train.parse_args(args))
    with pytest.raises(SystemExit):
        train.parse_args(xattn_args(patch_tokens, tmp_path / "c", tiny_gpt2_dir, "--prefix_length", "4"))
    assert "--prefix_length: --mapping_type xattn has no prefix mapper" in capsys.readouterr().err


def test_scst_fine_tunes_a_frozen_xattn_model(tmp_path, tiny_gpt2_dir):
    references = [[text, CAPTIONS[(row + 1) % len(CAPTIONS)]] for row, text in enumerate(CAPTIONS)]
    data = write_patch_tokens(tmp_path / "train.pkl", references)
    ce_dir = tmp_path / "ce"
    train.main(train.parse_args(xattn_args(data, ce_dir, tiny_gpt2_dir, "--epochs", "2", "--only_prefix")))
    initial = load_checkpoint(ce_dir / "coco_prefix-001.pt")
    model = train.main(train.parse_args(scst_args(data, ce_dir / "coco_prefix-001.pt", tmp_path / "run", "--epochs", "1")))
    assert model.config.cross_attention and model.lm_frozen
    saved = read_checkpoint(tmp_path / "run" / "scst-000.pt")["model"]
    changed = [name for name, tensor in initial.state_dict().items() if name in saved and not torch.equal(saved[name], tensor)]
    assert any(is_cross_attention_weight(name) for name in changed)  # the new layers learned
    assert all(name.startswith("clip_project.") or is_cross_attention_weight(name) for name in changed)


def test_patch_tokens_to_captions_through_every_script(tmp_path, tiny_clip_dir, tiny_gpt2_dir, capsys):
    """parse_coco_clip.py --feature_type patch_tokens (store) -> train.py xattn -> predict.py on the
    images -> evaluate.py --checkpoint: the same captions from the images as from their features."""
    paths = {"images_dir": tmp_path / "images", "captions_file": tmp_path / "dataset.json"}
    paths["images_dir"].mkdir()
    entries = []
    texts = [CAPTIONS[row] for row in (0, 1, 6, 7)]  # the shorter ones: a few steps learn them
    for number, text in enumerate(texts):
        write_image(paths["images_dir"] / f"img{number}.jpg", "rgb", seed=number + 1)
        entries.append({"filename": f"img{number}.jpg", "split": "test", "cocoid": number, "sentences": [{"raw": text}] * 4})
    paths["captions_file"].write_text(json.dumps({"images": entries}))
    store = tmp_path / "tokens"
    extraction = folder_args(paths, store, "--feature_type", "patch_tokens", "--output_format", "shards")
    extraction[extraction.index("train")] = "test"
    parse_coco_clip.main(parse_coco_clip.parse_args(["--clip_model_type", str(tiny_clip_dir), *extraction]))
    features = read_features(store)
    assert features.token_count == 50
    assert json.loads((store / "meta.json").read_text())["store"]["feature_dtype"] == "fp16"  # the default for tokens

    out_dir = tmp_path / "run"
    train.main(train.parse_args(xattn_args(store, out_dir, tiny_gpt2_dir, "--epochs", "16", "--bs", "4")))
    checkpoint = out_dir / "coco_prefix-015.pt"
    assert load_checkpoint(checkpoint).config.encoder["feature_type"] == "patch_tokens"

    from_features, from_images = tmp_path / "from_features.json", tmp_path / "from_images.json"
    common = ["--checkpoint", str(checkpoint), "--decode", "greedy", "--device", "cpu"]
    predict.main(predict.parse_args(["--features", str(store), *common, "--output", str(from_features)]))
    predict.main(predict.parse_args([str(paths["images_dir"]), *common, "--output", str(from_images)]))
    by_features = {p["image_id"]: p["caption"] for p in json.loads(from_features.read_text())}
    by_images = {p["image_id"]: p["caption"] for p in json.loads(from_images.read_text())}
    assert by_features == {number: " ".join(text.split()) for number, text in enumerate(texts)}
    assert set(by_images.values()) == set(by_features.values())  # images re-encoded the same way (ids: file names)

    metrics = evaluate.main(
        evaluate.parse_args(
            [*common, "--features", str(store), "--references", str(paths["captions_file"]), "--split", "test",
             "--metrics", "Bleu", "CIDEr", "--output", str(tmp_path / "metrics.json")]
        )  # fmt: skip
    )
    assert metrics["scores"]["Bleu_4"] > 0.99


def test_an_exported_xattn_model_captions_as_its_checkpoint(trained, tmp_path):
    data, out_dir = trained
    checkpoint, exported = out_dir / "coco_prefix-015.pt", tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(exported)]))
    outputs = {}
    for name, source in (("pt", checkpoint), ("dir", exported)):
        outputs[name] = tmp_path / f"{name}.json"
        predict.main(
            predict.parse_args(
                ["--features", str(data), "--checkpoint", str(source), "--decode", "beam", "--output", str(outputs[name])]
            )
        )
    assert json.loads(outputs["pt"].read_text()) == json.loads(outputs["dir"].read_text())
    assert load_captioner(exported).config.cross_attention
    card = (exported / "README.md").read_text()
    assert "A cross-attention captioner" in card and "prefix captioner" not in card
