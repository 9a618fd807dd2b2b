"""Patch-token features (`--feature_type patch_tokens`): one (T, D) matrix per image, CLS then patches,
through both extraction scripts into the pickle and the store (fp16 by default), checked on reading,
handed to training batches unchanged, and encoded the same way from a recorded spec."""

import io
import json
import pickle
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    CLIPVisionModelWithProjection,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

import convert_features
import data.features
import parse_coco_clip
import parse_coco_dino
import stages.extract
from data.captions import CaptionCollator, build_caption_dataset
from data.errors import InputError
from data.features import FeatureFile, check_same_encoder, read_feature_file, write_feature_file
from data.images import load_rgb
from data.store import META_FILE, read_features
from models.encoders import encoder_from_spec, load_encoder
from models.lm import load_tokenizer
from models.tiny import save_tiny_dinov2
from stages.extract import iter_encoded_batches
from tests.test_encoders import save_whole_clip
from tests.test_extraction import write_image

KINDS = ("rgb", "gray", "rgba_png", "rgb")  # image i is images/img{i}.jpg
CLIP_TOKENS = 1 + (224 // 32) ** 2  # the tiny CLIP: 224 px, patch 32 -> CLS + 7 x 7 patches
DINO_TOKENS = 1 + (224 // 14) ** 2  # the tiny DINOv2: crop 224, patch 14 -> CLS + 16 x 16 patches


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A few generated images, one broken, with a Karpathy file of two captions each."""
    root = tmp_path_factory.mktemp("patch_images")
    (root / "images").mkdir()
    entries = []
    for number, kind in enumerate((*KINDS, "truncated")):
        write_image(root / "images" / f"img{number}.jpg", kind, seed=number + 1)
        sentences = [{"raw": f"image {number} caption {k}"} for k in range(2)]
        entries.append({"filename": f"img{number}.jpg", "split": "train", "cocoid": number, "sentences": sentences})
    (root / "dataset_test.json").write_text(json.dumps({"images": entries}))
    return {"images_dir": root / "images", "captions_file": root / "dataset_test.json"}


def folder_args(images: dict, output: Path, *extra: str) -> list[str]:
    return [
        "--coco_images_dir", str(images["images_dir"]), "--captions_file", str(images["captions_file"]),
        "--split", "train", "--output_file", str(output), "--device", "cpu", "--num_workers", "0",
        "--batch_size", "3", *extra,
    ]  # fmt: skip


def run_clip(model_dir: Path, images: dict, output: Path, *extra: str):
    args = ["--clip_model_type", str(model_dir), *folder_args(images, output, *extra)]
    return parse_coco_clip.main(parse_coco_clip.parse_args(args))


def run_dino(model_dir: Path, images: dict, output: Path, *extra: str):
    args = ["--dino_model_type", str(model_dir), *folder_args(images, output, *extra)]
    return parse_coco_dino.main(parse_coco_dino.parse_args(args))


def good_pixels(images: dict, preprocess) -> torch.Tensor:
    """The readable images, preprocessed as extraction does: (N, 3, 224, 224)."""
    return torch.stack([preprocess(load_rgb(images["images_dir"] / f"img{n}.jpg")) for n in range(len(KINDS))])


@pytest.fixture(scope="module")
def clip_pickle(images, tiny_clip_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("clip_patch") / "clip_patch.pkl"
    run_clip(tiny_clip_dir, images, output, "--feature_type", "patch_tokens")
    return output


def test_clip_patch_tokens_are_the_vision_towers_last_hidden_states(images, tiny_clip_dir, clip_pickle, capsys):
    features = read_feature_file(clip_pickle)
    assert features.embeddings.shape == (len(KINDS), CLIP_TOKENS, 64)  # the tower's width, not the 32-d projection
    assert (features.feature_dim, features.token_count, features.row_shape) == (64, CLIP_TOKENS, (CLIP_TOKENS, 64))
    assert features.meta["feature_type"] == features.meta["encoder"]["feature_type"] == "patch_tokens"
    assert (features.meta["feature_dim"], features.meta["row_shape"]) == (64, [CLIP_TOKENS, 64])
    assert features.meta["num_skipped"] == 1 and features.image_rows() == {n: n for n in range(len(KINDS))}

    _, preprocess = load_encoder(str(tiny_clip_dir))
    tower = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    with torch.inference_mode():
        expected = tower(pixel_values=good_pixels(images, preprocess)).last_hidden_state  # (N, T, 64)
    torch.testing.assert_close(features.embeddings, expected, atol=1e-5, rtol=1e-5)


def test_a_whole_clip_checkpoint_gives_its_vision_towers_tokens(tmp_path):
    """Hub CLIP ids are whole CLIPModel checkpoints: the tokens are its vision model's, at the tower's width."""
    clip = save_whole_clip(tmp_path, vision_width=48)
    encoder, _ = load_encoder(str(tmp_path), feature_type="patch_tokens")
    assert (encoder.spec.feature_type, encoder.spec.feature_dim, encoder.row_shape) == (
        "patch_tokens",
        48,
        (CLIP_TOKENS, 48),
    )
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(pixels), clip.vision_model(pixel_values=pixels).last_hidden_state)


def test_the_pooled_default_and_its_file_name_are_unchanged(images, tiny_clip_dir, tmp_path, monkeypatch):
    """Without --feature_type, CLIP gives image_embeds as before, and the token pickle limit does not apply."""
    monkeypatch.setattr(data.features, "MAX_PICKLE_TOKEN_BYTES", 1)
    monkeypatch.chdir(tmp_path)
    args = parse_coco_clip.parse_args(
        ["--clip_model_type", str(tiny_clip_dir), *folder_args(images, tmp_path / "x.pkl")]
    )
    args.output_file = None  # ClipCap's default name
    parse_coco_clip.main(args)
    name = f"oscar_split_{tiny_clip_dir.name}_train.pkl"
    features = read_feature_file(tmp_path / "data" / "coco" / name)
    assert features.embeddings.shape == (len(KINDS), 32) and features.token_count is None
    assert features.meta["feature_type"] == "image_embeds" and features.meta["row_shape"] == [32]


def test_clip_patch_token_store_is_fp16_by_default_and_fp32_when_asked(images, tiny_clip_dir, clip_pickle, tmp_path):
    pickled = read_feature_file(clip_pickle).embeddings
    run_clip(tiny_clip_dir, images, tmp_path / "store16", "--feature_type", "patch_tokens", "--output_format", "shards")
    meta = json.loads((tmp_path / "store16" / META_FILE).read_text())
    assert meta["store"]["feature_dtype"] == "fp16"
    assert (meta["feature_dim"], meta["row_shape"]) == (64, [CLIP_TOKENS, 64])
    store = read_features(tmp_path / "store16")
    assert store.embeddings.arrays[0].dtype == np.float16 and store.embeddings.shape == pickled.shape
    assert (store.feature_dim, store.token_count) == (64, CLIP_TOKENS)
    assert torch.equal(store.embeddings[:], pickled.half().float())  # the same encoding, rounded to fp16
    assert torch.equal(store.embeddings[2], pickled[2].half().float())  # one row: (T, D)

    run_clip(
        tiny_clip_dir, images, tmp_path / "store32", "--feature_type", "patch_tokens", "--output_format", "shards",
        "--feature_dtype", "fp32",
    )  # fmt: skip
    assert torch.equal(read_features(tmp_path / "store32").embeddings[:], pickled)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_patch_tokens_leave_the_registers_out(images, tmp_path, registers):
    model_dir = tmp_path / "dino"
    if registers:
        torch.manual_seed(0)
        config = Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14,
            num_register_tokens=registers,
        )  # fmt: skip
        Dinov2WithRegistersModel(config).save_pretrained(model_dir)
    else:
        save_tiny_dinov2(model_dir, num_layers=1)
    output = tmp_path / "dino.pkl"
    run_dino(model_dir, images, output, "--feature_type", "patch_tokens")
    features = read_feature_file(output)
    assert features.embeddings.shape == (len(KINDS), DINO_TOKENS, 32)
    assert features.meta["encoder"]["feature_type"] == "patch_tokens" and features.meta["feature_dim"] == 32

    _, preprocess = load_encoder(str(model_dir))
    with torch.inference_mode():
        hidden = (
            AutoModel.from_pretrained(model_dir).eval()(pixel_values=good_pixels(images, preprocess)).last_hidden_state
        )
    assert hidden.shape[1] == 1 + registers + DINO_TOKENS - 1  # CLS, registers, patches
    torch.testing.assert_close(features.embeddings[:, 0], hidden[:, 0], atol=1e-5, rtol=1e-5)  # the CLS token
    torch.testing.assert_close(features.embeddings[:, 1:], hidden[:, 1 + registers :], atol=1e-5, rtol=1e-5)


def test_the_recorded_spec_encodes_images_to_token_matrices(images, tiny_clip_dir, clip_pickle):
    """predict.py's image path: the spec a feature file (or checkpoint) records rebuilds the encoder, which gives
    (b, T, D) batches equal to the extracted rows."""
    features = read_feature_file(clip_pickle)
    encoder, preprocess = encoder_from_spec(features.meta["encoder"])
    assert encoder.row_shape == (CLIP_TOKENS, 64)
    paths = [images["images_dir"] / f"img{n}.jpg" for n in (*range(len(KINDS)), len(KINDS))]  # the last is broken
    batches = list(
        iter_encoded_batches(
            encoder, preprocess, paths, batch_size=2, num_workers=0, device=torch.device("cpu"),
            precision="fp32", progress=False,
        )
    )  # fmt: skip
    assert [tuple(batch.features.shape) for batch in batches] == [
        (2, CLIP_TOKENS, 64),
        (2, CLIP_TOKENS, 64),
        (0, CLIP_TOKENS, 64),
    ]
    assert [index for batch in batches for index, _ in batch.failures] == [len(KINDS)]
    torch.testing.assert_close(torch.cat([batch.features for batch in batches]), features.embeddings)


def test_a_too_large_token_pickle_is_refused_before_anything_is_encoded(images, tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data.features, "MAX_PICKLE_TOKEN_BYTES", 4 * CLIP_TOKENS * 64 * 3)  # 3 images' worth

    def never(*args, **kwargs):
        raise AssertionError("encoded an image")

    monkeypatch.setattr(stages.extract, "encode_pixels", never)
    output = tmp_path / "big.pkl"
    message = (
        r"big\.pkl: 5 images of 50 x 64 token features are 62\.5 KiB as float32, over the pickle's limit of 37\.5 KiB; "
        r"write a feature store instead \(--output_format shards\)$"
    )
    with pytest.raises(InputError, match=message) as error:
        run_clip(tiny_clip_dir, images, output, "--feature_type", "patch_tokens")
    assert "\n" not in str(error.value)
    assert not output.exists() and not Path(f"{output}.partial").exists()
    # A store has no such limit, and neither has a pickle of one vector per image.
    monkeypatch.undo()
    monkeypatch.setattr(data.features, "MAX_PICKLE_TOKEN_BYTES", 1)
    run_clip(tiny_clip_dir, images, tmp_path / "store", "--feature_type", "patch_tokens", "--output_format", "shards")
    assert read_features(tmp_path / "store").embeddings.shape == (len(KINDS), CLIP_TOKENS, 64)
    # Converting that store back to a pickle meets the same limit.
    with pytest.raises(InputError, match="over the pickle's limit"):
        convert_features.main(convert_features.parse_args([str(tmp_path / "store"), str(tmp_path / "back.pkl")]))


def test_resume_of_a_patch_token_extraction_equals_an_uninterrupted_run(
    images, tiny_clip_dir, clip_pickle, tmp_path, monkeypatch
):
    original = stages.extract.iter_encoded_batches

    def interrupted_after_one_batch(encoder, preprocess, paths, **kwargs):
        for number, batch in enumerate(original(encoder, preprocess, paths, **kwargs)):
            if number == 1:
                raise KeyboardInterrupt
            yield batch

    output = tmp_path / "resumed.pkl"
    options = ("--feature_type", "patch_tokens", "--checkpoint_every", "1")
    monkeypatch.setattr(stages.extract, "iter_encoded_batches", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run_clip(tiny_clip_dir, images, output, *options)
    assert len(list(Path(f"{output}.partial").glob("chunk-*.pt"))) == 1  # the first batch of 3
    monkeypatch.setattr(stages.extract, "iter_encoded_batches", original)
    with pytest.raises(InputError, match=r"other settings \(encoder\)"):  # image_embeds cannot resume it
        run_clip(tiny_clip_dir, images, output, "--checkpoint_every", "1", "--resume")
    run_clip(tiny_clip_dir, images, output, *options, "--resume")
    resumed, whole = read_feature_file(output), read_feature_file(clip_pickle)
    assert torch.equal(resumed.embeddings, whole.embeddings) and resumed.captions == whole.captions


def test_webdataset_patch_tokens_equal_the_folders(images, tiny_clip_dir, clip_pickle, tmp_path, capsys):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for number in range(len(KINDS)):
            for name, data in (
                (f"{number:03d}.jpg", (images["images_dir"] / f"img{number}.jpg").read_bytes()),
                (f"{number:03d}.txt", f"image {number} caption 0".encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    args = [
        "--clip_model_type", str(tiny_clip_dir), "--feature_type", "patch_tokens", "--input_format", "webdataset",
        "--input", str(tmp_path / "00000.tar"), "--output_format", "shards", "--output_file", str(tmp_path / "wds"),
        "--device", "cpu", "--num_workers", "0", "--batch_size", "3",
    ]  # fmt: skip
    parse_coco_clip.main(parse_coco_clip.parse_args(args))
    store = read_features(tmp_path / "wds")
    assert store.row_shape == (CLIP_TOKENS, 64) and store.meta["row_shape"] == [CLIP_TOKENS, 64]
    assert store.embeddings.arrays[0].dtype == np.float16
    assert torch.equal(store.embeddings[:], read_feature_file(clip_pickle).embeddings.half().float())
    assert "4 images x 50 tokens x 64 features" in capsys.readouterr().out


def token_features(num_images: int = 5, tokens: int = 4, width: int = 6) -> FeatureFile:
    embeddings = torch.randn(num_images, tokens, width, generator=torch.Generator().manual_seed(0))
    captions = [{"image_id": row, "caption": f"a red circle {row}", "clip_embedding": row} for row in range(num_images)]
    return FeatureFile(
        embeddings, captions, {"encoder": {"family": "clip", "name": "m", "feature_type": "patch_tokens"}}
    )


def test_a_store_shard_of_the_wrong_shape_is_refused_in_one_line(tmp_path):
    source = tmp_path / "tokens.pkl"
    write_feature_file(source, token_features())
    store = tmp_path / "store"
    convert_features.main(convert_features.parse_args([str(source), str(store), "--rows_per_shard", "3"]))
    meta = json.loads((store / META_FILE).read_text())
    assert meta["store"]["feature_dtype"] == "fp16" and meta["row_shape"] == [4, 6]  # fp16: the tokens' default
    assert torch.equal(read_features(store).embeddings[:], token_features().embeddings.half().float())

    shard = store / "shard-00001.npy"
    original = shard.read_bytes()
    np.save(shard, np.zeros((2, 3, 6), dtype=np.float16))  # one token short
    with pytest.raises(
        InputError, match=r"shard-00001\.npy: holds float16 \(2, 3, 6\), meta\.json says fp16 \(2, 4, 6\)"
    ) as error:
        read_features(store)
    assert "\n" not in str(error.value)
    np.save(shard, np.zeros((2, 24), dtype=np.float16))  # a pooled shard among token shards
    with pytest.raises(InputError, match=r"shard-00001\.npy: holds float16 \(2, 24\)"):
        read_features(store)
    shard.write_bytes(original)
    meta["row_shape"] = [4, 7]  # does not end in feature_dim
    (store / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"row_shape \[4, 7\] in meta\.json does not end in its feature_dim 6"):
        read_features(store)


class ZeroStrideTokens:
    def __reduce__(self):
        storage = torch.zeros(4).storage()  # 16 bytes shown as 100 images of 100 x 4 tokens
        return torch._utils._rebuild_tensor_v2, (storage, 0, (100, 100, 4), (0, 0, 1), False, {})


def _pickle(path: Path, embeddings) -> Path:
    captions = [{"image_id": 1, "caption": "x", "clip_embedding": 0}]
    path.write_bytes(pickle.dumps({"clip_embedding": embeddings, "captions": captions}))
    return path


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_the_restricted_unpickler_takes_3d_tensors_and_still_refuses_bad_strides(tmp_path):
    strided = torch.arange(24.0).reshape(2, 4, 3).transpose(1, 2)  # (2, 3, 4), not contiguous
    assert torch.equal(read_feature_file(_pickle(tmp_path / "ok.pkl", strided)).embeddings, strided)
    assert torch.equal(read_feature_file(_pickle(tmp_path / "np.pkl", strided.numpy())).embeddings, strided)
    with pytest.raises(InputError, match=r"shape \(100, 100, 4\) and strides \(0, 0, 1\) does not fit its buffer of 4"):
        read_feature_file(_pickle(tmp_path / "bad.pkl", ZeroStrideTokens()))
    tokens = torch.zeros(3, 4, 2)
    tokens[1, 3, 0] = float("nan")  # one token of one image
    with pytest.raises(InputError, match=r"1 feature row\(s\) hold NaN or infinite values \(rows 1\)"):
        read_feature_file(_pickle(tmp_path / "nan.pkl", tokens))
    with pytest.raises(InputError, match="rows of 0 tokens"):
        read_feature_file(_pickle(tmp_path / "empty.pkl", torch.zeros(1, 0, 2)))
    with pytest.raises(InputError, match="must be a 2-D or 3-D real tensor"):
        read_feature_file(_pickle(tmp_path / "4d.pkl", torch.zeros(1, 2, 2, 2)))


@pytest.mark.parametrize("source", ["pickle", "store"])
def test_training_batches_hand_token_matrices_through(tmp_path, tiny_gpt2_dir, source):
    features = token_features()
    write_feature_file(tmp_path / "tokens.pkl", features)
    if source == "store":
        convert_features.main(convert_features.parse_args([str(tmp_path / "tokens.pkl"), str(tmp_path / "store")]))
    loaded = read_features(tmp_path / ("tokens.pkl" if source == "pickle" else "store"))
    dataset = build_caption_dataset(loaded, load_tokenizer(str(tiny_gpt2_dir)), cache_dir=tmp_path / "cache")
    batch = CaptionCollator(pad_token_id=0)([dataset[index] for index in (3, 0, 4)])
    expected = features.embeddings[[3, 0, 4]]  # (B, T, D)
    torch.testing.assert_close(batch.features, expected if source == "pickle" else expected.half().float())


def test_patch_tokens_and_image_embeds_of_one_model_are_different_encoders():
    features = token_features()
    pooled = {**features.meta["encoder"], "feature_type": "image_embeds"}
    with pytest.raises(
        InputError,
        match=r"holds features of clip m \(patch_tokens\), but the captioner expects clip m \(image_embeds\)",
    ):
        check_same_encoder(features, "f.pkl", pooled, "the captioner")
    check_same_encoder(features, "f.pkl", features.meta["encoder"], "the captioner")


def test_an_aligned_encoder_has_no_patch_tokens(tmp_path, images):
    from models.aligned import save_aligned_encoder
    from stages.align_sides import build_image_side

    args = Namespace(
        image_encoder="tiny_cnn", no_pretrained=False, image_size=32, projection_hidden=None, cnn_channels=[4, 8],
        cnn_stem=4, text_encoder="a text tower", train_text=False,
    )  # fmt: skip
    model, _ = build_image_side(args, text_dim=8)
    save_aligned_encoder(tmp_path / "encoder", model.eval())
    with pytest.raises(
        InputError, match=r"encoder: an aligned encoder \(train_clip\.py\) gives projected embeddings only"
    ) as error:
        run_clip(tmp_path / "encoder", images, tmp_path / "x.pkl", "--feature_type", "patch_tokens")
    assert "\n" not in str(error.value)
