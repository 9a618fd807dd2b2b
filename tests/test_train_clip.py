"""Stage 0 (train_clip.py): the InfoNCE loss and its temperature, Recall@K against a brute-force count,
the aligned encoder through extraction, training and captioning, the text-embedding cache, resume, and
bad input as one line."""

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import parse_coco_clip
import predict
import train
import train_clip
from data.annotations import read_annotations
from data.errors import InputError
from data.features import read_feature_file
from data.synthetic import DATASET_FILE
from models import contrastive
from models.clip_score import ClipScorer
from models.contrastive import MAX_LOGIT_SCALE, ContrastivePair, info_nce_loss, retrieval_recall
from models.encoders import load_encoder
from stages.train_clip import AlignmentTrainer
from tests.test_training import crash_at_step

REPO = Path(__file__).resolve().parents[1]
RECALL_NAMES = [f"{way}_R@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]


def test_info_nce_equals_a_direct_implementation():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    scale = torch.tensor(7.0)
    cosine = [[float(F.cosine_similarity(image, text, dim=0)) for text in texts] for image in images]
    image_to_text = -sum(
        math.log(math.exp(scale * cosine[i][i]) / sum(math.exp(scale * cosine[i][j]) for j in range(5)))
        for i in range(5)
    )
    text_to_image = -sum(
        math.log(math.exp(scale * cosine[j][j]) / sum(math.exp(scale * cosine[i][j]) for i in range(5)))
        for j in range(5)
    )
    expected = (image_to_text + text_to_image) / 10  # the mean over pairs, then over the two directions
    assert info_nce_loss(images, texts, scale).item() == pytest.approx(expected, rel=1e-5)


def test_temperature_starts_at_clip_value_is_learned_and_clamped():
    pair = ContrastivePair(torch.nn.Linear(4, 3))
    assert pair.logit_scale().item() == pytest.approx(1 / 0.07)
    output = pair(torch.randn(6, 4), text_embeds=torch.randn(6, 3))
    output.loss.backward()
    assert pair.log_logit_scale.grad is not None and pair.log_logit_scale.grad.item() != 0  # learned
    with torch.no_grad():
        pair.log_logit_scale.fill_(math.log(1000.0))
    pair.log_logit_scale.grad = None
    pair(torch.randn(6, 4), text_embeds=torch.randn(6, 3)).loss.backward()
    # Past the bound the scale still has a gradient: no clamp inside autograd leaves it stuck there.
    assert pair.logit_scale().item() == pytest.approx(1000.0) and pair.log_logit_scale.grad.item() != 0
    pair.clamp_logit_scale()  # after each optimizer step, as CLIP does
    assert pair.logit_scale().item() == pytest.approx(MAX_LOGIT_SCALE)


def test_a_temperature_past_the_bound_is_back_at_it_after_one_step(synthetic, tmp_path, monkeypatch):
    """A scale that starts (or resumes) above 100 trains one step at its value and is then put back at 100;
    a clamp inside autograd would hide it at 100 in the forward and leave the parameter there forever."""
    monkeypatch.setattr(contrastive, "INITIAL_TEMPERATURE", 1 / 200)
    run = tmp_path / "run"
    train_clip.main(train_clip.parse_args(align_args(synthetic, run, "--epochs", "1")))
    scales = [json.loads(line)["logit_scale"] for line in (run / "align_log.jsonl").read_text().splitlines()[:3]]
    assert scales[0] == pytest.approx(200.0) and scales[1] == pytest.approx(MAX_LOGIT_SCALE)  # float32's 100
    saved = torch.load(run / "align_latest.pt", weights_only=True)["model"]["log_logit_scale"]
    assert saved.item() <= math.log(MAX_LOGIT_SCALE) + 1e-6  # and free to move below it again


def brute_force_recall(similarity: torch.Tensor, text_image: list[int]) -> dict[str, float]:
    """Rank by sorting, a match placed behind every non-match of the same score."""
    num_images, num_texts = similarity.shape
    recall = {}
    image_ranks = []
    for image in range(num_images):
        order = sorted(range(num_texts), key=lambda text: (-similarity[image, text].item(), text_image[text] == image))
        image_ranks.append(next(rank for rank, text in enumerate(order) if text_image[text] == image))
    text_ranks = []
    for text in range(num_texts):
        order = sorted(
            range(num_images), key=lambda image: (-similarity[image, text].item(), image == text_image[text])
        )
        text_ranks.append(order.index(text_image[text]))
    for way, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in (1, 5, 10):
            recall[f"{way}_R@{k}"] = 100 * sum(rank < k for rank in ranks) / len(ranks)
    return recall


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_recall_at_k_matches_a_brute_force_count_with_ties(chunk):
    # 12 images as basis vectors; 30 captions (2 or 3 per image) with two 1s each: every cosine is 0 or
    # 1/sqrt(2), so ties are everywhere, and a caption may or may not touch its own image.
    generator = torch.Generator().manual_seed(3)
    num_images = 12
    text_image = [image for image in range(num_images) for _ in range(2 + image % 2)]
    texts = torch.zeros(len(text_image), num_images)
    for row, image in enumerate(text_image):
        touched = torch.randperm(num_images, generator=generator)[:2].tolist()
        if row % 3 == 0 and image not in touched:
            touched[0] = image  # a third of the captions are near their own image
        texts[row, touched] = 1.0
    images = torch.eye(num_images)
    recall = retrieval_recall(images, texts, torch.tensor(text_image), chunk=chunk)
    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    expected = brute_force_recall(similarity, text_image)
    assert {name: recall[name] for name in RECALL_NAMES} == pytest.approx(expected)
    assert recall["R@sum"] == pytest.approx(sum(expected.values()))
    assert 0 < expected["i2t_R@5"] < 100 and 0 < expected["t2i_R@5"] < 100  # the case is not degenerate


def test_a_constant_encoder_scores_zero_not_full_recall():
    recall = retrieval_recall(torch.ones(20, 4), torch.ones(40, 4), torch.arange(20).repeat_interleave(2))
    assert recall["i2t_R@10"] == 0 and recall["t2i_R@10"] == 0  # ties count against


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "align_log.jsonl").read_text().splitlines()]


def align_args(synthetic: dict, out_dir: Path, *extra: str, dataset: Path | None = None) -> list[str]:
    return [
        *("--captions_file", str(dataset or synthetic["dataset"]), "--images_dir", str(synthetic["images"])),
        *("--split", "train", "--val_split", "val", "--image_encoder", "tiny_cnn", "--cnn_channels", "8", "16"),
        *("--image_size", "32", "--text_encoder", str(synthetic["clip"]), "--out_dir", str(out_dir)),
        *("--epochs", "2", "--bs", "8", "--lr", "1e-3", "--num_workers", "0", "--device", "cpu"),
        *("--cache_dir", str(synthetic["root"] / "cache")),
        *extra,
    ]


def test_train_clip_to_extraction_training_and_captioning(synthetic, tmp_path):
    """train_clip.py -> parse_coco_clip.py --clip_model_type ENCODER_DIR -> train.py -> predict.py."""
    run = tmp_path / "align"
    retrieval = train_clip.main(train_clip.parse_args(align_args(synthetic, run, "--train_text")))
    saved = json.loads((run / "retrieval.json").read_text())
    assert saved == json.loads(json.dumps(retrieval)) and len(saved["epochs"]) == 2
    for record in saved["epochs"]:
        assert set(RECALL_NAMES) <= record.keys() and record["R@sum"] == pytest.approx(
            sum(record[n] for n in RECALL_NAMES)
        )
    assert saved["best"] == max(saved["epochs"], key=lambda record: record["R@sum"])

    encoder, preprocess = load_encoder(str(run / "encoder"))  # by path, like any other encoder
    assert encoder.spec.family == "aligned" and encoder.spec.feature_dim == 16 and encoder.spec.crop_dim == 32
    config = json.loads((run / "encoder" / "config.json").read_text())
    assert config["source"]["epoch"] == saved["best"]["epoch"]
    assert config["source"]["text_space"] is None  # --train_text moved the text tower: no CLIP's space (parse_corpus.py)
    latest = torch.load(run / "align_latest.pt", weights_only=True)  # loads without unpickling code
    if saved["best"]["epoch"] == 1:  # the kept encoder is the last epoch's: the resume checkpoint's weights
        weights = load_file(run / "encoder" / "model.safetensors")
        assert all(torch.equal(weights[name], latest["model"][f"image_encoder.{name}"]) for name in weights)

    features = tmp_path / "train.pkl"
    common = ["--clip_model_type", str(run / "encoder"), "--coco_images_dir", str(synthetic["images"])]
    common += ["--captions_file", str(synthetic["dataset"]), "--num_workers", "0"]
    parse_coco_clip.main(parse_coco_clip.parse_args([*common, "--split", "train", "--output_file", str(features)]))
    feature_file = read_feature_file(features)
    assert feature_file.meta["encoder"]["family"] == "aligned" and feature_file.feature_dim == 16
    # The features are the projected embeddings of the loaded encoder.
    from data.images import load_rgb

    first = synthetic["images"] / read_annotations(synthetic["dataset"], "train")[0].file_path
    with torch.no_grad():
        direct = encoder(preprocess(load_rgb(first))[None])[0]
    torch.testing.assert_close(feature_file.embeddings[0], direct, rtol=1e-5, atol=1e-5)

    captioner = tmp_path / "captioner"
    train.main(
        train.parse_args(
            ["--data", str(features), "--out_dir", str(captioner), "--gpt2", str(synthetic["gpt2"]), "--epochs", "1"]
            + ["--bs", "16", "--cache_dir", str(synthetic["root"] / "cache"), "--device", "cpu"]
        )
    )
    checkpoint = captioner / "coco_prefix-000.pt"
    assert torch.load(checkpoint, weights_only=True)["config"]["encoder"]["family"] == "aligned"
    output = tmp_path / "predictions.json"
    predict.main(
        predict.parse_args(
            [str(synthetic["images"] / "test"), "--checkpoint", str(checkpoint), "--output", str(output)]
            + ["--max_length", "8", "--device", "cpu"]
        )
    )
    assert len(json.loads(output.read_text())) == 4


def test_frozen_text_embeddings_are_cached_and_a_changed_caption_misses(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCAP_PLUS_CACHE_DIR", str(tmp_path / "cache"))
    args = [arg for arg in align_args(synthetic, tmp_path / "first", "--epochs", "1") if arg]
    args = args[: args.index("--cache_dir")] + args[args.index("--cache_dir") + 2 :]  # the default cache dir
    original, calls = ClipScorer.text_embeddings, []

    def counted(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(ClipScorer, "text_embeddings", counted)
    train_clip.main(train_clip.parse_args(args))
    assert len(calls) == 2 and list((tmp_path / "cache" / "text_embeddings").glob("*.pt"))  # train and val captions

    calls.clear()
    second = [*args[: args.index("--out_dir") + 1], str(tmp_path / "second"), *args[args.index("--out_dir") + 2 :]]
    train_clip.main(train_clip.parse_args(second))
    assert calls == []  # the text tower was not run

    changed = json.loads(synthetic["dataset"].read_text())
    changed["images"][0]["sentences"][0]["raw"] = "a caption that was not there before"
    changed_file = tmp_path / DATASET_FILE
    changed_file.write_text(json.dumps(changed))
    third = align_args(synthetic, tmp_path / "third", "--epochs", "1", dataset=changed_file)
    third = third[: third.index("--cache_dir")] + third[third.index("--cache_dir") + 2 :]
    train_clip.main(train_clip.parse_args(third))
    assert calls == [24 * 5]  # the training captions changed; the validation ones came from the cache


@pytest.mark.parametrize("crash_step, resume_point", [(4, (3, 1, 0)), (6, (4, 1, 1))])
def test_resume_reaches_the_encoder_of_an_uninterrupted_run(synthetic, tmp_path, monkeypatch, crash_step, resume_point):
    """Killed between epochs (its end-of-epoch checkpoint) or within one (--save_latest_every 2's), then
    resumed: the weights, recalls and log of a run that was never stopped."""
    train_clip.main(train_clip.parse_args(align_args(synthetic, tmp_path / "straight")))
    resumed_dir = tmp_path / "resumed"
    args = align_args(synthetic, resumed_dir, "--save_latest_every", "2")
    crash_at_step(monkeypatch, AlignmentTrainer, crash_step, args, train_clip)
    position = torch.load(resumed_dir / "align_latest.pt", weights_only=True)["position"]
    assert (position["step"], position["epoch"], position["batch_in_epoch"]) == resume_point
    train_clip.main(train_clip.parse_args([*args, "--resume", str(resumed_dir)]))
    straight = torch.load(tmp_path / "straight" / "align_latest.pt", weights_only=True)
    resumed = torch.load(resumed_dir / "align_latest.pt", weights_only=True)
    assert all(torch.equal(straight["model"][name], resumed["model"][name]) for name in straight["model"])
    straight_recall, resumed_recall = (
        json.loads((tmp_path / run / "retrieval.json").read_text()) for run in ("straight", "resumed")
    )
    assert straight_recall["epochs"] == resumed_recall["epochs"] and len(resumed_recall["epochs"]) == 2
    straight_log, resumed_log = (
        [
            {name: value for name, value in record.items() if name != "images_per_s"}
            for record in read_log(tmp_path / run)
        ]
        for run in ("straight", "resumed")
    )
    assert resumed_log == straight_log and [record["step"] for record in resumed_log if "loss" in record] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    with pytest.raises(InputError, match="lr is 0.01 here but 0.001 in the saved run"):
        train_clip.main(train_clip.parse_args([*args, "--resume", str(resumed_dir), "--lr", "1e-2"]))


@pytest.fixture(scope="module")
def interrupted_run(synthetic, tmp_path_factory) -> Path:
    """An alignment run killed in its second epoch: align_latest.pt from step 4, mid-epoch."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        args = align_args(synthetic, run, "--save_latest_every", "2")
        crash_at_step(monkeypatch, AlignmentTrainer, 6, args, train_clip)
    return run


def first_group_only(checkpoint: dict) -> None:
    checkpoint["optimizer"]["param_groups"].pop()


def wrong_moment_shape(checkpoint: dict) -> None:
    checkpoint["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


def not_finite(checkpoint: dict) -> None:
    checkpoint["model"]["log_logit_scale"].fill_(math.nan)


def position(**changes) -> Callable[[dict], None]:
    return lambda checkpoint: checkpoint["position"].update(changes)


@pytest.mark.parametrize(
    "tamper, message",
    [
        pytest.param(position(data="0" * 16), "the training images or captions differ", id="another run's data"),
        pytest.param(lambda c: c.update(options=["lr"]), "not a resumable checkpoint (options is list", id="options"),
        pytest.param(position(step="4"), "the saved position is damaged (step '4')", id="step"),
        pytest.param(position(batch_in_epoch=-2), "damaged (batch_in_epoch -2)", id="batch_in_epoch"),
        pytest.param(position(epoch=7), "damaged (epoch 7)", id="epoch past --epochs"),
        pytest.param(lambda c: c["position"]["history"][0].pop("R@sum"), "damaged (history", id="history"),
        pytest.param(position(skipped=["x"]), "damaged (skipped", id="skipped"),
        pytest.param(first_group_only, "RNG state do not fit this run (loaded state dict has a", id="param groups"),
        pytest.param(wrong_moment_shape, "state of a (8, 3, 4, 4)-shaped parameter is (3,)-shaped", id="moment shape"),
        pytest.param(lambda c: c["rng"][0].update(cpu=torch.zeros(3)), "RNG state do not fit", id="rng"),
        pytest.param(lambda c: c.update(scheduler={"last_epoch": "x"}), "RNG state do not fit", id="scheduler"),
        pytest.param(not_finite, "the saved weights are not finite", id="weights"),
    ],
)
def test_a_tampered_resume_checkpoint_is_one_line(synthetic, interrupted_run, tmp_path, tamper, message):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    checkpoint = torch.load(run / "align_latest.pt", weights_only=True)
    tamper(checkpoint)
    torch.save(checkpoint, run / "align_latest.pt")
    with pytest.raises(InputError, match=re.escape(str(run / "align_latest.pt")) + ".*" + re.escape(message)):
        train_clip.main(train_clip.parse_args(align_args(synthetic, run, "--resume", str(run))))


def test_an_existing_run_needs_resume_or_overwrite(synthetic, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "retrieval.json").write_text("{}")
    with pytest.raises(InputError, match="already holds an alignment run .*--overwrite"):
        train_clip.main(train_clip.parse_args(align_args(synthetic, tmp_path / "run")))


def test_unreadable_images_are_skipped_and_reported(synthetic, tmp_path):
    dataset = json.loads(synthetic["dataset"].read_text())
    broken = tmp_path / "images"
    shutil.copytree(synthetic["images"], broken)
    train_image = next(image for image in dataset["images"] if image["split"] == "train")
    (broken / train_image["filepath"] / train_image["filename"]).write_bytes(b"not a jpeg")
    args = align_args(synthetic, tmp_path / "run", "--epochs", "1")
    args[args.index("--images_dir") + 1] = str(broken)
    train_clip.main(train_clip.parse_args(args))
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert list(skipped) == [str(broken / train_image["filepath"] / train_image["filename"])]
    assert "not an image" in next(iter(skipped.values()))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("--image_encoder", "resnet9000"),
            "--image_encoder: not resnet50 or tiny_cnn, and unknown image encoder 'resnet9000'",
        ),
        (("--text_encoder", "TINY_VISION"), "needs a whole CLIP model with a text tower"),
        (("--val_split", "bogus"), "a Karpathy file needs a split"),
        (("--split", "restval"), "no captioned images in split 'restval'"),
    ],
)
def test_bad_input_is_one_line(synthetic, tmp_path, tiny_clip_dir, change, message):
    args = align_args(synthetic, tmp_path / "run")
    flag, value = change
    args[args.index(flag) + 1] = str(tiny_clip_dir) if value == "TINY_VISION" else value
    result = subprocess.run(
        [sys.executable, "train_clip.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: ") and message in lines[-1], lines[-1]


def test_a_caption_with_a_lone_surrogate_is_one_line_naming_its_image(synthetic, tmp_path):
    """JSON can escape half a surrogate pair ("\\ud800"), which is no text and has no UTF-8: alignment and
    the extraction of its features (a pickle, or a store's parquet) refuse the file in one line naming the image."""
    dataset = json.loads(synthetic["dataset"].read_text())
    number = next(number for number, image in enumerate(dataset["images"]) if image["split"] == "train")
    dataset["images"][number]["sentences"][1]["raw"] = "a red \ud800 circle"
    broken = tmp_path / DATASET_FILE
    broken.write_text(json.dumps(dataset))  # as the escape \ud800, valid JSON
    message = re.escape(f"{broken}: images[{number}]: caption holds a lone surrogate '\\ud800' at character 6")
    with pytest.raises(InputError, match=message):
        train_clip.main(train_clip.parse_args(align_args(synthetic, tmp_path / "run", dataset=broken)))
    for output_format, output in (("pickle", tmp_path / "train.pkl"), ("shards", tmp_path / "train_store")):
        flags = ["--clip_model_type", str(synthetic["clip"]), "--coco_images_dir", str(synthetic["images"])]
        flags += ["--captions_file", str(broken), "--split", "train", "--output_file", str(output)]
        with pytest.raises(InputError, match=message):
            parse_coco_clip.main(parse_coco_clip.parse_args([*flags, "--output_format", output_format]))
        assert not output.exists()


def test_empty_captions_are_refused_as_train_py_refuses_them(synthetic, tmp_path):
    """Every caption "": nothing to align the images to. Refused before anything is trained or written, in
    the words train.py uses for captions that tokenize to nothing."""
    dataset = json.loads(synthetic["dataset"].read_text())
    for image in dataset["images"]:
        for sentence in image["sentences"]:
            sentence["raw"] = ""
    empty = tmp_path / DATASET_FILE
    empty.write_text(json.dumps(dataset))
    message = f"tokenizer '{synthetic['clip']}' turns 120 of 120 captions into no tokens; the captions are empty"
    with pytest.raises(InputError, match=re.escape(message)):
        train_clip.main(train_clip.parse_args(align_args(synthetic, tmp_path / "run", dataset=empty)))
    assert not (tmp_path / "run" / "encoder").exists() and not (tmp_path / "run" / "align_latest.pt").exists()


def test_resnet50_without_its_weights_offline_is_one_line(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache: a download would be needed
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    args = align_args(synthetic, tmp_path / "run", "--epochs", "1")
    args[args.index("--image_encoder") + 1] = "resnet50"
    with pytest.raises(InputError, match="cannot load torchvision's ImageNet weights .*--no_pretrained"):
        train_clip.main(train_clip.parse_args(args))


@pytest.mark.parametrize("tower", ["tiny_cnn", "resnet50", "clip", "dinov2"])
def test_every_tower_saves_and_loads_as_an_aligned_encoder(tmp_path, tower, tiny_clip_dir, tiny_dino_dir):
    """Whatever the tower, the encoder directory rebuilds from its config and gives the same features."""
    from argparse import Namespace

    from models.aligned import save_aligned_encoder
    from stages.align_sides import build_image_side

    names = {"clip": str(tiny_clip_dir), "dinov2": str(tiny_dino_dir)}
    args = Namespace(
        image_encoder=names.get(tower, tower), no_pretrained=tower == "resnet50", image_size=None,
        projection_hidden=None, cnn_channels=[8, 16], cnn_stem=4, text_encoder="a text tower", train_text=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model, (resize_dim, crop_dim, _, _) = build_image_side(args, text_dim=24)
    save_aligned_encoder(tmp_path / "encoder", model.eval())
    encoder, preprocess = load_encoder(str(tmp_path / "encoder"))
    assert encoder.spec.family == "aligned" and encoder.spec.feature_dim == 24
    assert (encoder.spec.resize_dim, encoder.spec.crop_dim) == (resize_dim, crop_dim)
    pixels = torch.randn(2, 3, crop_dim, crop_dim)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), model(pixels))
    assert not any(parameter.requires_grad for parameter in encoder.parameters())  # frozen, as every encoder


def test_a_config_declaring_a_huge_head_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """A small encoder directory whose config.json claims a 20,000-wide head (1.6 GB of weights) is refused
    from the weights file's header: the head is only ever built on the meta device."""
    import json as json_module

    from models import aligned
    from models.aligned import AlignedConfig, AlignedImageEncoder, save_aligned_encoder

    torch.manual_seed(0)
    values = {
        "tower": "tiny_cnn", "tower_config": {"channels": [8], "stem": 4}, "tower_dim": 8, "projection_hidden": 16,
        "feature_dim": 8, "resize_dim": 32, "crop_dim": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
    }  # fmt: skip
    save_aligned_encoder(tmp_path / "encoder", AlignedImageEncoder(AlignedConfig.from_dict(values, "test")))
    config_file = tmp_path / "encoder" / "config.json"
    config_file.write_text(
        json_module.dumps({**json_module.loads(config_file.read_text()), "projection_hidden": 20_000})
    )
    head_devices = []
    original_head = aligned.projection_head

    def recording_head(*sizes):
        head = original_head(*sizes)
        head_devices.append(next(head.parameters()).device.type)
        return head

    monkeypatch.setattr(aligned, "projection_head", recording_head)
    with pytest.raises(InputError, match="the weights do not match config.json"):
        load_encoder(str(tmp_path / "encoder"))
    assert head_devices == ["meta"]
