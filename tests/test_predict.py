"""predict.py end to end with tiny models: images and feature files in, `path<TAB>caption` lines,
COCO results JSON and a contact sheet out; original ClipCap state dicts through --weights; bad input."""

import json
import pickle
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from data.annotations import image_id_from_path
from data.errors import InputError, exit_on_input_error
from data.features import FeatureFile, write_feature_file
from data.predictions import expand_image_inputs
from data.sheet import draw_contact_sheet
from models.checkpoint import build_captioner, load_checkpoint, save_checkpoint
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, caption_features
from models.encoders import load_encoder
from models.lm import load_lm, load_tokenizer
from predict import main, parse_args
from stages.extract import iter_encoded_batches
from stages.predict import caption_image_files
from tests.conftest import REPO
from tests.test_images import png_claiming

IMAGE_NAMES = ("COCO_val2014_000000000042.jpg", "000000000007.png", "red circle.jpg")
DECODING = ["--decode", "beam", "--beam_size", "3", "--max_length", "6"]


@pytest.fixture(scope="module")
def encoder_spec(tiny_clip_dir):
    encoder, _ = load_encoder(str(tiny_clip_dir))
    return encoder.spec.to_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_gpt2_dir, encoder_spec):
    """A checkpoint as train.py writes it, with the tiny CLIP recorded as its encoder."""
    torch.manual_seed(0)
    config = CaptionerConfig(
        feature_dim=encoder_spec["feature_dim"], prefix_length=4, lm_name=str(tiny_gpt2_dir), encoder=encoder_spec
    )
    path = tmp_path_factory.mktemp("checkpoint") / "model-000.pt"
    save_checkpoint(path, build_captioner(config, load_lm(str(tiny_gpt2_dir))))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three drawn images and one file that is not an image, in one directory."""
    directory = tmp_path_factory.mktemp("images")
    for number, name in enumerate(IMAGE_NAMES):
        image = Image.new("RGB", (96 + 40 * number, 80), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((10, 10, 60, 60), fill=(200, 30 + 90 * number, 40))
        image.save(directory / name)
    (directory / "broken.jpg").write_bytes(b"not a jpeg at all")
    return directory


def captions_of(model, tokenizer, features, options):
    return [group[0] for group in caption_features(model, tokenizer, features, options)]


def test_predict_images_end_to_end(tmp_path, checkpoint, images, tiny_clip_dir):
    output, sheet = tmp_path / "preds.json", tmp_path / "sheet.png"
    command = [sys.executable, "predict.py", str(images), "--checkpoint", str(checkpoint), "--device", "cpu"]
    command += ["--output", str(output), "--sheet", str(sheet), "--sheet_max", "2", "--num_workers", "0", *DECODING]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)

    # The unreadable file is reported and makes the exit status non-zero; the others are captioned.
    assert result.returncode != 0
    assert f"error: {images / 'broken.jpg'}:" in result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    printed = {path: caption for path, caption in lines}
    paths = sorted(images / name for name in IMAGE_NAMES)
    assert sorted(printed) == [str(path) for path in paths]

    # Same captions as encoding with the checkpoint's recorded encoder and decoding in-process.
    model = load_checkpoint(checkpoint)
    encoder, preprocess = load_encoder(str(tiny_clip_dir))
    kwargs = {"batch_size": 8, "num_workers": 0, "device": torch.device("cpu"), "precision": "fp32", "progress": False}
    (batch,) = iter_encoded_batches(encoder, preprocess, paths, **kwargs)
    options = DecodingOptions(method="beam", beam_size=3, max_length=6)
    expected = captions_of(model, load_tokenizer(model.config.lm_name), batch.features, options)
    assert [printed[str(path)] for path in paths] == expected

    results = json.loads(output.read_text())
    assert sorted(results, key=str) == sorted(
        [{"image_id": image_id_from_path(path), "caption": printed[str(path)]} for path in paths], key=str
    )
    assert {entry["image_id"] for entry in results} == {42, 7, "red circle"}
    # --sheet_max 2: the first two images, side by side.
    assert f"contact sheet: {sheet} (2 of 3 images)" in result.stderr
    with Image.open(sheet) as drawn:
        assert 2 * 256 < drawn.width < 3 * 256 and drawn.height > 256


def test_predict_feature_file(tmp_path, checkpoint, capsys):
    features = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    captions = [{"image_id": image_id, "caption": "x", "clip_embedding": row} for row, image_id in enumerate((5, 9, 1))]
    captions.append({"image_id": 9, "caption": "second caption of image 9", "clip_embedding": 1})
    feature_path, output = tmp_path / "features.pkl", tmp_path / "preds.json"
    write_feature_file(feature_path, FeatureFile(features, captions, {}))

    main(parse_args(["--features", str(feature_path), "--checkpoint", str(checkpoint), "--output", str(output)]))

    model = load_checkpoint(checkpoint)
    expected = captions_of(model, load_tokenizer(model.config.lm_name), features, DecodingOptions())
    assert json.loads(output.read_text()) == [
        {"image_id": image_id, "caption": caption} for image_id, caption in zip((5, 9, 1), expected)
    ]
    assert capsys.readouterr().out.splitlines() == [f"{i}\t{c}" for i, c in zip((5, 9, 1), expected)]


@pytest.mark.parametrize(
    "settings",
    [
        {"mapping_type": "mlp", "prefix_length": 4},
        {
            "mapping_type": "transformer",
            "prefix_length": 4,
            "prefix_length_clip": 3,
            "num_layers": 2,
            "normalize_prefix": True,
        },
    ],
)
def test_clipcap_state_dict_captions_through_weights(tmp_path, tiny_gpt2_dir, images, tiny_clip_dir, settings, capsys):
    torch.manual_seed(1)
    model = build_captioner(CaptionerConfig(feature_dim=32, lm_name=str(tiny_gpt2_dir), **settings))
    weights = tmp_path / "coco_weights.pt"
    torch.save(model.state_dict(), weights)  # ClipCap saves the bare state dict
    flags = [f"--{key}" if value is True else f"--{key}={value}" for key, value in settings.items()]
    paths = [images / name for name in IMAGE_NAMES[:2]]
    main(
        parse_args(
            [*map(str, paths), "--weights", str(weights), "--gpt2", str(tiny_gpt2_dir), "--device", "cpu"]
            + ["--clip_model_type", str(tiny_clip_dir), "--num_workers", "0", *flags, *DECODING]
        )
    )
    encoder, preprocess = load_encoder(str(tiny_clip_dir))
    kwargs = {"batch_size": 8, "num_workers": 0, "device": torch.device("cpu"), "precision": "fp32", "progress": False}
    (batch,) = iter_encoded_batches(encoder, preprocess, paths, **kwargs)
    # ClipCap's models never learnt EOS, so --weights stops at "." unless told otherwise.
    options = DecodingOptions(method="beam", beam_size=3, max_length=6, stop_token=".")
    expected = captions_of(model.eval(), load_tokenizer(str(tiny_gpt2_dir)), batch.features, options)
    assert capsys.readouterr().out.splitlines() == [f"{path}\t{caption}" for path, caption in zip(paths, expected)]


def test_clipcap_transformer_weights_caption_a_clipcap_feature_pickle(tmp_path, tiny_gpt2_dir, capsys):
    """The route for ClipCap's transformer_weights.pt, trained on RN50x4 features no transformers model
    gives: its own parse_coco.py pickle (plain pickle.dump of tensors, 640-d there) through --features."""
    torch.manual_seed(2)
    settings = {"mapping_type": "transformer", "prefix_length": 4, "prefix_length_clip": 3, "num_layers": 2}
    model = build_captioner(
        CaptionerConfig(feature_dim=40, lm_name=str(tiny_gpt2_dir), normalize_prefix=True, **settings)
    )
    model.freeze_lm()
    weights = tmp_path / "transformer_weights.pt"
    torch.save({name: value for name, value in model.state_dict().items() if name.startswith("clip_project.")}, weights)
    features = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    captions = [{"image_id": image_id, "caption": "x", "clip_embedding": row} for row, image_id in enumerate((5, 9, 1))]
    pickle_path = tmp_path / "oscar_split_RN50x4_test.pkl"
    with open(pickle_path, "wb") as handle:
        pickle.dump({"clip_embedding": features, "captions": captions}, handle)  # as ClipCap's parse_coco.py

    flags = [f"--{key}={value}" for key, value in settings.items()] + ["--normalize_prefix", "--decode", "greedy"]
    common = ["--weights", str(weights), "--gpt2", str(tiny_gpt2_dir), "--device", "cpu", "--max_length", "6"]
    main(parse_args(["--features", str(pickle_path), *common, *flags]))
    options = DecodingOptions(method="greedy", max_length=6, stop_token=".")
    expected = captions_of(model.eval(), load_tokenizer(str(tiny_gpt2_dir)), features, options)
    assert capsys.readouterr().out.splitlines() == [f"{i}\t{c}" for i, c in zip((5, 9, 1), expected)]
    # --stop_token "" turns the "." off: EOS or --max_length only.
    main(parse_args(["--features", str(pickle_path), *common, *flags, "--stop_token", ""]))
    expected = captions_of(model, load_tokenizer(str(tiny_gpt2_dir)), features, DecodingOptions("greedy", max_length=6))
    assert capsys.readouterr().out.splitlines() == [f"{i}\t{c}" for i, c in zip((5, 9, 1), expected)]


def test_bad_inputs_are_one_line(tmp_path, checkpoint, tiny_gpt2_dir, images, encoder_spec):
    image = str(images / IMAGE_NAMES[0])
    with pytest.raises(InputError, match="checkpoint not found"):
        main(parse_args([image, "--checkpoint", str(tmp_path / "missing.pt")]))
    with pytest.raises(InputError, match="exactly one"):
        main(parse_args([image]))
    with pytest.raises(InputError, match="cannot write a contact sheet as .txt"):  # before loading anything
        main(parse_args([image, "--checkpoint", str(tmp_path / "missing.pt"), "--sheet", "sheet.txt"]))
    # ClipCap weights given with the wrong settings.
    model = build_captioner(CaptionerConfig(feature_dim=32, prefix_length=4, lm_name=str(tiny_gpt2_dir)))
    weights = tmp_path / "coco_weights.pt"
    torch.save(model.state_dict(), weights)
    features = tmp_path / "features.pkl"
    write_feature_file(
        features, FeatureFile(torch.randn(1, 32), [{"image_id": 1, "caption": "x", "clip_embedding": 0}])
    )
    with pytest.raises(InputError, match="prefix|shape|match"):
        main(parse_args(["--features", str(features), "--weights", str(weights), "--gpt2", str(tiny_gpt2_dir)]))
    # A checkpoint whose mapper expects other features than its encoder gives.
    narrow = CaptionerConfig(feature_dim=16, prefix_length=4, lm_name=str(tiny_gpt2_dir), encoder=encoder_spec)
    save_checkpoint(tmp_path / "narrow.pt", build_captioner(narrow, load_lm(str(tiny_gpt2_dir))))
    with pytest.raises(InputError, match="mapper expects 16-d"):
        main(parse_args([image, "--checkpoint", str(tmp_path / "narrow.pt")]))
    with pytest.raises(InputError, match="mapper expects 16-d"):
        main(parse_args(["--features", str(features), "--checkpoint", str(tmp_path / "narrow.pt")]))


def test_missing_checkpoint_is_one_line_and_exit_status_2(tmp_path, capsys):
    # What `python predict.py ...` does under its __main__ guard.
    with pytest.raises(SystemExit) as exited, exit_on_input_error():
        main(parse_args(["x.jpg", "--checkpoint", str(tmp_path / "none.pt")]))
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {tmp_path / 'none.pt'}: checkpoint not found"


def test_image_ids_from_file_names():
    assert image_id_from_path("val2014/COCO_val2014_000000123456.jpg") == 123456
    assert image_id_from_path("COCO_train2014_000000000009.jpg") == 9
    assert image_id_from_path("/data/val2017/000000123456.jpg") == 123456
    assert image_id_from_path("photos/my dog.png") == "my dog"


def test_inputs_expand_directories_and_globs_once(images):
    named = images / IMAGE_NAMES[0]
    found = expand_image_inputs([str(images), str(images / "*.png"), str(named)])
    assert found == sorted(images.iterdir())  # the directory's images; the glob and file add nothing new
    assert expand_image_inputs([str(images / "*.png")]) == [images / IMAGE_NAMES[1]]
    with pytest.raises(InputError, match="no file matches"):
        expand_image_inputs([str(images / "*.gif")])


def test_contact_sheet_grid(tmp_path, images):
    paths = [images / name for name in IMAGE_NAMES]
    sheet = draw_contact_sheet(
        paths, ["one", "two " * 40, "three"], tmp_path / "sheet.jpg", columns=2, thumbnail_size=64
    )
    with Image.open(sheet) as drawn:
        assert drawn.format == "JPEG"
        assert drawn.width == 2 * (64 + 8) + 8  # two columns
        assert drawn.height > 2 * 64  # two rows, each with room for its caption
    with pytest.raises(InputError, match="cannot write"):
        draw_contact_sheet(paths, ["a", "b", "c"], tmp_path / "sheet.txt")


def test_seeded_sampling_draws_on_across_batches(tmp_path, checkpoint, images, tiny_clip_dir):
    """Two copies of one image in separate batches get different samples; the run repeats exactly."""
    copies = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for copy in copies:
        copy.write_bytes((images / IMAGE_NAMES[0]).read_bytes())
    model = load_checkpoint(checkpoint)
    encoder, preprocess = load_encoder(str(tiny_clip_dir))
    options = DecodingOptions(method="sample", seed=0, num_captions=4, max_length=8)
    kwargs = {"batch_size": 1, "num_workers": 0, "device": torch.device("cpu"), "precision": "fp32", "progress": False}

    def sample() -> list[list[str]]:
        results = caption_image_files(
            model, load_tokenizer(model.config.lm_name), encoder, preprocess, copies, options, **kwargs
        )
        return [result.captions for result in results]

    first = sample()
    assert first[0] != first[1]
    assert sample() == first


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resize_dim": "224"}, "'resize_dim' is '224', not an integer"),
        ({"resize_dim": 224.0}, "'resize_dim' is 224.0, not an integer"),
        ({"crop_dim": True}, "'crop_dim' is True, not an integer"),
        ({"family": ["clip"]}, "'family' is \\['clip'\\], not a string"),
        ({"feature_dim": "32"}, "'feature_dim' is '32', not an integer"),
        ({"std": [0.2, 0.2]}, "'std' is \\[0.2, 0.2\\], not 3 numbers"),
        ({"family": "nope"}, "unknown encoder family 'nope'"),
    ],
)
def test_a_checkpoint_with_a_mistyped_encoder_spec_is_one_line(tmp_path, checkpoint, change, message):
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["encoder"].update(change)
    torch.save(saved, tmp_path / "tampered.pt")
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    with pytest.raises(
        InputError, match=f"^{re.escape(str(tmp_path / 'tampered.pt'))}: (the encoder spec's )?{message}"
    ):
        main(parse_args([str(image), "--checkpoint", str(tmp_path / "tampered.pt"), "--num_workers", "0"]))


def viewed_embeddings(saved: dict, vocab_size: int) -> None:
    """Embeddings of `vocab_size` rows stored as one: a stride-0 view, which torch.save keeps as such."""
    saved["config"]["lm_config"]["vocab_size"] = vocab_size
    row = saved["model"]["gpt.transformer.wte.weight"][:1].clone()  # a storage of one row
    for name in ("gpt.transformer.wte.weight", "gpt.lm_head.weight"):
        saved["model"][name] = row.expand(vocab_size, -1)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda saved: saved["model"].update({1: torch.zeros(1)}), "the weights are not a state dict of tensors"),
        (lambda saved: saved["model"].update({"clip_project.model.0.weight": "x"}), "not a state dict of tensors"),
        (
            lambda saved: saved["model"].update({"clip_project.model.0.weight": torch.zeros(3, 3)}),
            "clip_project.model.0.weight has shape \\(3, 3\\), the config expects",
        ),
        # 1 kB claiming 256 MB of embeddings that the config agrees with (10^8 rows would claim 25.6 GB).
        (lambda saved: viewed_embeddings(saved, 10**6), "claims shape \\(1000000, 64\\) but the file holds 256 bytes"),
        (lambda saved: saved.update({"config": 5}), "the captioner config is int 5, not a dict"),
        (lambda saved: saved["config"].update({1: 2}), "unknown captioner config key\\(s\\): 1"),
        (
            lambda saved: saved["config"]["lm_config"].update(model_type="nope"),
            "model_type 'nope' is not a transformers",
        ),
        (lambda saved: saved["config"]["lm_config"].update(n_layer="2"), "n_layer' expected int, got str"),
        (
            lambda saved: saved["config"]["lm_config"].update(n_layer=10**6),
            "declares 1000000 blocks, the weights hold 2",
        ),
        (
            lambda saved: saved["config"]["lm_config"].update(vocab_size=10**12),
            "wte.weight has shape \\(\\d+, 64\\), the config expects \\(1000000000000, 64\\)",
        ),
        (
            lambda saved: saved["config"].update(prefix_length=10**9),
            "no buildable model: Storage size calculation overflowed",
        ),
    ],
)
def test_a_checkpoint_that_lies_is_refused_in_one_line_before_building(tmp_path, checkpoint, tamper, message):
    """Weights that do not match the config, a config of absurd sizes, entries that are no tensors, a tensor
    that claims more values than the file holds: refused in one line naming the file, from shapes and names
    (on the meta device), before the model the config describes is built."""
    saved = torch.load(checkpoint, weights_only=True)
    tamper(saved)
    torch.save(saved, tmp_path / "lying.pt")
    assert (tmp_path / "lying.pt").stat().st_size < 2 * checkpoint.stat().st_size
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'lying.pt'))}: .*{message}"):
        main(parse_args([str(image), "--checkpoint", str(tmp_path / "lying.pt"), "--num_workers", "0"]))


def test_odd_images_caption_and_bombs_are_refused_in_one_line(tmp_path, checkpoint, monkeypatch, capsys):
    """16-bit and 32-bit gray, animated GIF and WebP (their first frame), CMYK, a palette with a transparent
    entry: each captioned. Past PIL's pixel limit (lowered here so a bomb is small): refused, each in one
    line naming it, before decoding; between the limit and twice it PIL itself would only warn."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # above the 224x224 crops PIL also checks
    directory = tmp_path / "images"
    directory.mkdir()
    gray = (torch.arange(30 * 40).reshape(30, 40) * 50).numpy()
    Image.fromarray(gray.astype("uint16")).save(directory / "gray16.png")
    Image.fromarray(gray.astype("int32") * 1000, mode="I").save(directory / "gray32.tif")
    frames = [Image.new("RGB", (40, 30), color) for color in ((250, 0, 0), (0, 250, 0))]
    for name in ("animated.gif", "animated.webp"):
        frames[0].save(directory / name, save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(directory / "cmyk.jpg")
    Image.new("RGB", (40, 30), (0, 0, 250)).convert("P").save(directory / "palette.png", transparency=0)
    Image.new("RGB", (350, 350)).save(directory / "warned.png")  # 122500 pixels: between the limit and twice it
    (directory / "bomb.png").write_bytes(png_claiming(50_000, 50_000))  # 100 bytes claiming 2.5 gigapixels
    modes = {path.name: Image.open(path).mode for path in directory.iterdir() if path.suffix != ".png"}
    assert modes == {"gray32.tif": "I", "animated.gif": "P", "animated.webp": "RGB", "cmyk.jpg": "CMYK"}
    refused = ("bomb.png", "warned.png")
    with pytest.raises(InputError, match="^2 of 8 images could not be read"):
        main(parse_args([str(directory), "--checkpoint", str(checkpoint), "--num_workers", "0", *DECODING]))
    out, err = capsys.readouterr()
    captioned = sorted(line.split("\t")[0] for line in out.splitlines())
    assert captioned == sorted(str(path) for path in directory.iterdir() if path.name not in refused)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert [line.split(": too large (")[0] for line in errors] == [f"error: {directory / name}" for name in refused]
    assert "Warning" not in err
