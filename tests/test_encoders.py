"""Encoders: loading by path, the features each type returns, preprocessing against transformers' processors."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data.errors import InputError
from models.encoders import encoder_from_spec, load_encoder
from models.tiny import save_tiny_dinov2

# The PIL-based processors: named *Pil since transformers 5.x made torchvision the default backend.
CLIPImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
BitImageProcessorPil = getattr(transformers, "BitImageProcessorPil", transformers.BitImageProcessor)

# (width, height): landscape, portrait, square, smaller than the crop (upscaled), odd margins.
IMAGE_SIZES = [(640, 480), (480, 640), (224, 224), (100, 50), (640, 427), (333, 500), (500, 333), (227, 300)]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def transformers_processor(family: str):
    """The processors of openai/clip-vit-base-patch32 and facebook/dinov2-base (their preprocessor_config.json)."""
    if family == "clip":
        return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def reference_crop_offset(size: int, crop: int) -> int:
    """torchvision's (and so OpenAI CLIP's and DINOv2's) center-crop offset: round half to even."""
    return int(round((size - crop) / 2.0))


@pytest.fixture(scope="module")
def encoders(tiny_clip_dir, tiny_dino_dir):
    return {"clip": load_encoder(str(tiny_clip_dir)), "dinov2": load_encoder(str(tiny_dino_dir))}


@pytest.mark.parametrize("family", ["clip", "dinov2"])
@pytest.mark.parametrize(("width", "height"), IMAGE_SIZES)
def test_preprocessing_equals_the_transformers_image_processor(encoders, family, width, height):
    """Resize and normalization equal transformers' PIL processor everywhere; the crop equals it wherever
    both conventions put the crop at the same offset, and sits at torchvision's offset otherwise."""
    _, preprocess = encoders[family]
    processor = transformers_processor(family)
    image = noise_image(width, height)
    ours = preprocess(image)
    uncropped = processor(image, do_center_crop=False, return_tensors="pt").pixel_values[0]  # (3, H', W')
    top = reference_crop_offset(uncropped.shape[1], 224)
    left = reference_crop_offset(uncropped.shape[2], 224)
    if min(uncropped.shape[1:]) >= 224:
        torch.testing.assert_close(ours, uncropped[:, top : top + 224, left : left + 224], atol=1e-5, rtol=0)
    cropped = processor(image, return_tensors="pt").pixel_values[0]
    floors_agree = (top, left) == ((uncropped.shape[1] - 224) // 2, (uncropped.shape[2] - 224) // 2)
    if floors_agree:
        torch.testing.assert_close(ours, cropped, atol=1e-5, rtol=0)
    else:  # 640x427 -> 335x224: the 111-pixel margin splits 56/55 in torchvision, 55/56 in transformers
        assert not torch.allclose(ours, cropped)
        torch.testing.assert_close(ours[:, :, :-1], cropped[:, :, 1:], atol=1e-5, rtol=0)


def test_clip_features_are_the_projected_final_norm_cls_token(encoders, tiny_clip_dir):
    """What OpenAI CLIP's encode_image computes: ln_post(CLS) @ proj, not normalized."""
    encoder, preprocess = encoders["clip"]
    pixels = torch.stack([preprocess(noise_image(64, 48, seed)) for seed in range(3)])
    with torch.inference_mode():
        features = encoder(pixels)
        vision = encoder.model.vision_model
        hidden = vision.encoder(inputs_embeds=vision.pre_layrnorm(vision.embeddings(pixels))).last_hidden_state
        expected = encoder.model.visual_projection(vision.post_layernorm(hidden[:, 0]))
    assert features.dtype == torch.float32 and features.shape == (3, 32)
    torch.testing.assert_close(features, expected)
    assert encoder.spec.to_dict() == {
        "family": "clip",
        "name": str(tiny_clip_dir.resolve()),
        "feature_type": "image_embeds",
        "resize_dim": 224,
        "crop_dim": 224,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "feature_dim": 32,
    }


def save_whole_clip(directory, vision_width: int) -> CLIPModel:
    """A whole CLIPModel (both towers, projection 24), as hub CLIP ids are, saved to `directory`; seeded."""
    torch.manual_seed(0)
    vision = {
        "hidden_size": vision_width,
        "intermediate_size": 2 * vision_width,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "patch_size": 32,
    }
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).eval()
    clip.save_pretrained(directory)
    return clip


def test_full_clip_checkpoint_loads_its_vision_tower(tmp_path):
    """Hub CLIP ids are whole CLIPModel checkpoints; the vision tower and projection load from them."""
    clip = save_whole_clip(tmp_path, vision_width=64)
    encoder, preprocess = load_encoder(str(tmp_path))
    pixels = preprocess(noise_image(80, 60))[None]
    with torch.inference_mode():
        expected = clip.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(encoder(pixels), expected)
    assert encoder.spec.family == "clip" and encoder.spec.feature_dim == 24


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_feature_types(tmp_path, registers):
    torch.manual_seed(0)
    if registers:
        config = Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14
        )
        Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    else:
        save_tiny_dinov2(tmp_path, num_layers=1)
    features = {}
    for feature_type in ("cls", "avg_patch", "cls_avg_patch"):
        encoder, preprocess = load_encoder(str(tmp_path), feature_type=feature_type)
        pixels = torch.stack([preprocess(noise_image(90, 70, seed)) for seed in range(2)])
        with torch.inference_mode():
            features[feature_type] = encoder(pixels)
            hidden = encoder.model(pixel_values=pixels).last_hidden_state  # (B, 1 + R + 16*16, H)
        assert encoder.spec.feature_dim == features[feature_type].shape[1]
    assert hidden.shape[1] == 1 + registers + 16 * 16  # 224 crop / patch 14
    torch.testing.assert_close(features["cls"], hidden[:, 0])
    torch.testing.assert_close(features["avg_patch"], hidden[:, 1 + registers :].mean(dim=1))
    assert torch.equal(features["cls_avg_patch"], torch.cat((features["cls"], features["avg_patch"]), dim=1))


def test_dinov2_resize_and_crop_flags(tiny_dino_dir):
    encoder, preprocess = load_encoder(str(tiny_dino_dir), resize_dim=140, crop_dim=112)
    assert preprocess(noise_image(300, 200)).shape == (3, 112, 112)
    assert (encoder.spec.resize_dim, encoder.spec.crop_dim) == (140, 112)
    with pytest.raises(InputError, match="crop size 300 is larger than the resize size 256"):
        load_encoder(str(tiny_dino_dir), crop_dim=300)


def test_encoder_from_spec_rebuilds_the_same_encoder(encoders):
    encoder, preprocess = encoders["dinov2"]
    rebuilt, rebuilt_preprocess = encoder_from_spec(encoder.spec.to_dict())
    pixels = preprocess(noise_image(120, 90))[None]
    assert torch.equal(rebuilt_preprocess(noise_image(120, 90)), pixels[0])
    with torch.inference_mode():
        assert torch.equal(rebuilt(pixels), encoder(pixels))
    with pytest.raises(InputError, match="gives 32-d features, the spec records 99"):
        encoder_from_spec({**encoder.spec.to_dict(), "feature_dim": 99})


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("RN50x4", {}, "RN50x4: OpenAI's ResNet CLIP models have no transformers version.*--features"),
        ("ViT-H/14", {}, "unknown image encoder 'ViT-H/14': not a short name"),
        ("ViT-B/32", {"family": "dinov2"}, "'ViT-B/32' is a clip model, not dinov2"),
        ("dinov2_vitb14", {}, r"cannot load image encoder 'dinov2_vitb14' \(facebook/dinov2-base\)"),
        ("{clip}", {"family": "dinov2"}, "is a clip model, not dinov2"),
        ("{dino}", {"feature_type": "image_embeds"}, "feature type 'image_embeds' is not one of dinov2's"),
        ("{gpt2}", {}, "is a 'gpt2' model; expected CLIP or DINOv2"),
    ],
)
def test_bad_encoder_names_are_one_line_input_errors(
    tiny_clip_dir, tiny_dino_dir, tiny_gpt2_dir, name, options, message
):
    name = name.format(clip=tiny_clip_dir, dino=tiny_dino_dir, gpt2=tiny_gpt2_dir)
    with pytest.raises(InputError, match=message) as error:
        load_encoder(name, **options)
    assert "\n" not in str(error.value)


def test_a_checkpoint_without_the_projection_is_refused(tmp_path):
    """CLIPVisionModel (no projection) would otherwise load with a randomly initialized projection."""
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=32
    )
    CLIPVisionModel(config).save_pretrained(tmp_path)
    # transformers 5.25 names the projection alone; 5.17 finds none of the tower's weights under that class.
    with pytest.raises(InputError, match=r"checkpoint lacks \d+ weight\(s\), e.g. (visual_projection|vision_model)"):
        load_encoder(str(tmp_path))
