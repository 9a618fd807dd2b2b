"""Frozen image encoders (CLIP, DINOv2, and train_clip.py's aligned encoders, family "aligned"), each with
its preprocessing: `load_encoder(name)` returns `(encoder, preprocess)` as OpenAI CLIP's `clip.load`
does, so extraction and prediction share the pair.

Preprocessing is the models' reference transform, built from torchvision as OpenAI CLIP and DINOv2
build theirs: resize the short side (bicubic), center-crop, scale to [0, 1], normalize. It equals the
transformers image processors (`CLIPImageProcessorPil`, `BitImageProcessorPil`) except where the
center crop has to split an odd margin whose half is odd: torchvision rounds that offset half to even,
transformers floors it, so the crop can sit one pixel apart (see tests/test_encoders.py).
"""

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import torch
from torch import nn
from torchvision import transforms
from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection, PretrainedConfig, PreTrainedModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import logging as transformers_logging

from data.errors import InputError, first_line
from models.aligned import AlignedImageEncoder, is_aligned_dir, load_aligned_encoder, save_aligned_encoder

Preprocess = Callable[[Any], torch.Tensor]  # PIL.Image (RGB) -> (3, crop, crop) float32

# The short names of ClipCap (OpenAI CLIP) and of the DINOv2 hub entry points.
CLIP_MODELS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
DINOV2_MODELS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
    "dinov2_vits14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_vitb14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_vitl14_reg": "facebook/dinov2-with-registers-large",
    "dinov2_vitg14_reg": "facebook/dinov2-with-registers-giant",
}
# OpenAI CLIP's ResNets (ClipCap's transformer_weights.pt was trained on RN50x4): transformers has none.
CLIP_RESNETS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
# transformers model_type -> family, for ids and directories given instead of a short name.
FAMILY_OF_MODEL_TYPE = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
}
# "aligned": a train_clip.py directory (any tower); its features are the projection head's embeddings.
# "patch_tokens": a (T, D) matrix per image, the CLS token then the patch tokens (no registers).
FEATURE_TYPES = {
    "clip": ("image_embeds", "patch_tokens"),
    "dinov2": ("cls", "avg_patch", "cls_avg_patch", "patch_tokens"),
    "aligned": ("projected",),
}
DINOV2_RESIZE_DIM = 256  # DINOv2's evaluation transform: resize to 256, crop 224
DINOV2_CROP_DIM = 224
# The fields of a recorded spec that encoder_from_spec needs (an export needs them all).
ENCODING_FIELDS = ("family", "name", "feature_type", "resize_dim", "crop_dim")
MAX_IMAGE_SIDE = 4096  # a larger resize or crop is a typo, and would exhaust memory before any message


@dataclass
class EncoderSpec:
    """Everything that decides an image's feature vector; stored in feature files and checkpoints."""

    family: str  # "clip", "dinov2" or "aligned"
    name: str  # resolved transformers id or local directory
    feature_type: str  # "image_embeds" (CLIP); "cls", "avg_patch" or "cls_avg_patch" (DINOv2); "projected";
    # "patch_tokens" (CLIP and DINOv2)
    resize_dim: int  # short side after the bicubic resize
    crop_dim: int  # side of the center crop the model sees
    mean: list[float]
    std: list[float]
    feature_dim: int  # D: the width of a vector, or of each token for patch_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SPEC_FIELD_TYPES = get_type_hints(EncoderSpec)


def _has_type(value: Any, kind: type) -> bool:
    """Whether a recorded spec value is of its field's type: bool is an int to isinstance, but no size; mean
    and std are one number per RGB channel."""
    if get_origin(kind) is list:
        return isinstance(value, list) and len(value) == 3 and all(_has_type(item, float) for item in value)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def check_encoder_spec(spec: dict[str, Any], source: str, required: tuple[str, ...] = ENCODING_FIELDS) -> None:
    """A recorded spec (`EncoderSpec.to_dict()`, from `source`, a file that may be anyone's) has the `required`
    fields, and each field it has is of its type."""
    missing = [name for name in required if name not in spec]
    if missing:
        raise InputError(f"{source}: the encoder spec lacks {', '.join(missing)}")
    for name, kind in SPEC_FIELD_TYPES.items():
        if name in spec and not _has_type(spec[name], kind):
            expected = {str: "a string", int: "an integer"}.get(kind, "3 numbers (one per RGB channel)")
            raise InputError(f"{source}: the encoder spec's {name!r} is {spec[name]!r}, not {expected}")


class ImageEncoder(nn.Module):
    """A frozen vision model that turns pixels (B, 3, H, W) into float32 features: one vector per image
    (B, D), or for patch_tokens one token matrix per image (B, T, D)."""

    def __init__(self, model: PreTrainedModel | AlignedImageEncoder, spec: EncoderSpec):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        # Register tokens (DINOv2 *_reg) sit between the CLS token and the patch tokens.
        self.num_prefix_tokens = 1 + getattr(getattr(model, "config", None), "num_register_tokens", 0)
        self.row_shape = _row_shape(model, spec)

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Keep the frozen model in eval mode whatever mode is asked for."""
        super().train(mode)
        self.model.eval()  # no dropout in a frozen feature extractor
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, crop, crop), normalized by `preprocess` -> features (B, D), or (B, T, D) for
        patch_tokens, float32."""
        if self.spec.family == "aligned":
            return self.model(pixel_values).float()  # (B, D): tower, then projection head
        if self.spec.feature_type == "patch_tokens" and self.spec.family == "clip":
            # The tower's last hidden states, CLS then patches: before CLIP's post-layernorm and projection,
            # which it applies to the CLS token alone.
            return self.model.vision_model(pixel_values=pixel_values).last_hidden_state.float()  # (B, 1 + N, H)
        if self.spec.family == "clip":
            # The projected CLS token: what OpenAI CLIP's encode_image returns (not L2-normalized).
            return self.model(pixel_values=pixel_values).image_embeds.float()  # (B, D)
        hidden = self.model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + R + N, H), final-normed
        if self.spec.feature_type == "patch_tokens":  # the registers are left out
            return torch.cat((hidden[:, :1], hidden[:, self.num_prefix_tokens :]), dim=1).float()  # (B, 1 + N, H)
        cls_token = hidden[:, 0]  # (B, H)
        if self.spec.feature_type == "cls":
            return cls_token.float()
        mean_patch = hidden[:, self.num_prefix_tokens :].mean(dim=1)  # (B, H)
        if self.spec.feature_type == "avg_patch":
            return mean_patch.float()
        return torch.cat((cls_token, mean_patch), dim=1).float()  # (B, 2H)


def _row_shape(model: PreTrainedModel | AlignedImageEncoder, spec: EncoderSpec) -> tuple[int, ...]:
    """One image's feature shape: (D,), or (T, D) for patch_tokens with T = 1 + (crop // patch)^2."""
    if spec.feature_type != "patch_tokens":
        return (spec.feature_dim,)
    patches_per_side = spec.crop_dim // model.config.patch_size  # the patch embedding's stride drops the rest
    return (1 + patches_per_side**2, spec.feature_dim)


def build_preprocess(resize_dim: int, crop_dim: int, mean: list[float], std: list[float]) -> Preprocess:
    """The reference transform of OpenAI CLIP and DINOv2: bicubic short-side resize, center crop, normalize."""
    return transforms.Compose(
        [
            transforms.Resize(resize_dim, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop_dim),
            transforms.ToTensor(),  # (3, crop, crop) in [0, 1]
            transforms.Normalize(mean, std),
        ]
    )



def _resolve_name(name: str, family: str | None) -> tuple[str, str | None]:
    """A short name becomes its transformers id and family; anything else passes through."""
    if name in CLIP_RESNETS:
        raise InputError(
            f"{name}: OpenAI's ResNet CLIP models have no transformers version, so they cannot encode images "
            f"here; caption features extracted by ClipCap's parse_coco.py with --features instead"
        )
    for table_family, table in (("clip", CLIP_MODELS), ("dinov2", DINOV2_MODELS)):
        if name in table:
            if family is not None and family != table_family:
                raise InputError(f"{name!r} is a {table_family} model, not {family}")
            return table[name], table_family
    return name, family


def _cannot_load(name: str, model_id: str, error: Exception) -> InputError:
    """One line: why `name` did not load, and what names are known when it is not one of them."""
    if name in CLIP_MODELS or name in DINOV2_MODELS:
        return InputError(f"cannot load image encoder {name!r} ({model_id}): {first_line(error)}")
    short_names = ", ".join([*CLIP_MODELS, *DINOV2_MODELS])
    return InputError(
        f"unknown image encoder {name!r}: not a short name ({short_names}), a local model directory, "
        f"or a loadable transformers id ({first_line(error)})"
    )


def _read_config(model_id: str, name: str) -> PretrainedConfig:
    """The saved config, read before the weights: a wrong model class would load random weights."""
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise _cannot_load(name, model_id, error) from None
    if config.model_type not in FAMILY_OF_MODEL_TYPE:
        raise InputError(f"image encoder {name!r} is a {config.model_type!r} model; expected CLIP or DINOv2")
    return config


def _load_model(model_id: str, name: str, config: PretrainedConfig) -> PreTrainedModel:
    """The vision model with every weight from the checkpoint (a missing one is an error, not random init)."""
    if config.model_type == "clip":
        # A whole CLIP checkpoint (as on the hub): keep its vision tower, with the projection width
        # of the whole model (the vision config's own field may hold the default).
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        model_class, config = CLIPVisionModelWithProjection, vision_config
    else:
        model_class = CLIPVisionModelWithProjection if config.model_type == "clip_vision_model" else AutoModel
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # a CLIP checkpoint's text tower is "unexpected": expected here
    try:
        model, loading_info = model_class.from_pretrained(model_id, config=config, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise _cannot_load(name, model_id, error) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = sorted(loading_info["missing_keys"]) + sorted(key for key, *_ in loading_info["mismatched_keys"])
    if missing:
        raise InputError(f"image encoder {name!r}: checkpoint lacks {len(missing)} weight(s), e.g. {missing[0]}")
    return model


def _check_image_sizes(resize_dim: int, crop_dim: int, patch_size: int) -> None:
    """Sizes the preprocessing can make and the model can see (given 0, they used to become the defaults)."""
    for flag, value in (("--resize_dim", resize_dim), ("--crop_dim", crop_dim)):
        if not patch_size <= value <= MAX_IMAGE_SIDE:
            raise InputError(f"{flag} {value}: must be from the model's patch size {patch_size} to {MAX_IMAGE_SIDE}")
    if crop_dim > resize_dim:
        raise InputError(f"crop size {crop_dim} is larger than the resize size {resize_dim}")


def load_encoder(
    name: str,
    *,
    family: str | None = None,
    feature_type: str | None = None,
    resize_dim: int | None = None,
    crop_dim: int | None = None,
) -> tuple[ImageEncoder, Preprocess]:
    """A frozen encoder (eval mode, CPU) and its preprocessing, by short name, transformers id or directory."""
    if family is not None and family not in FEATURE_TYPES:
        raise InputError(f"unknown encoder family {family!r}; choose from {', '.join(FEATURE_TYPES)}")
    model_id, family = _resolve_name(name, family)
    if os.path.isdir(model_id) and is_aligned_dir(model_id):
        # Either extraction script takes an aligned directory: its family is its own, whatever was asked.
        return _load_aligned(model_id, feature_type, resize_dim, crop_dim)
    if family == "aligned":
        raise InputError(f"image encoder {name!r} is not a train_clip.py encoder directory (no aligned config.json)")
    config = _read_config(model_id, name)
    saved_family = FAMILY_OF_MODEL_TYPE[config.model_type]
    if family is not None and family != saved_family:
        raise InputError(f"image encoder {name!r} is a {saved_family} model, not {family}")
    family = saved_family
    feature_type = feature_type or FEATURE_TYPES[family][0]
    if feature_type not in FEATURE_TYPES[family]:
        raise InputError(f"feature type {feature_type!r} is not one of {family}'s: {', '.join(FEATURE_TYPES[family])}")
    vision = config.vision_config if config.model_type == "clip" else config
    if family == "clip":
        # CLIP was trained at its config's image size and resizes straight to it (224, or 336 for @336px).
        crop_dim = vision.image_size if crop_dim is None else crop_dim
        resize_dim = crop_dim if resize_dim is None else resize_dim
        if crop_dim != vision.image_size:  # its position embeddings fit this size only
            raise InputError(f"crop size {crop_dim}: image encoder {name!r} takes {vision.image_size}-pixel crops only")
        mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    else:
        resize_dim = DINOV2_RESIZE_DIM if resize_dim is None else resize_dim
        crop_dim = DINOV2_CROP_DIM if crop_dim is None else crop_dim
        mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    _check_image_sizes(resize_dim, crop_dim, vision.patch_size)  # before the weights load: it takes a while
    model = _load_model(model_id, name, config)
    if feature_type == "patch_tokens":
        feature_dim = vision.hidden_size  # each token's width, before any projection
    elif family == "clip":
        feature_dim = model.visual_projection.out_features  # the projection itself, not a config field
    else:
        feature_dim = model.config.hidden_size * (2 if feature_type == "cls_avg_patch" else 1)
    # A local directory is recorded as an absolute path so a checkpoint finds it from anywhere.
    resolved = str(Path(model_id).resolve()) if os.path.isdir(model_id) else model_id
    spec = EncoderSpec(family, resolved, feature_type, resize_dim, crop_dim, mean, std, feature_dim)
    return ImageEncoder(model, spec), build_preprocess(resize_dim, crop_dim, mean, std)


def _load_aligned(
    directory: str, feature_type: str | None, resize_dim: int | None, crop_dim: int | None
) -> tuple[ImageEncoder, Preprocess]:
    """A train_clip.py encoder directory: its recorded preprocessing, its projected features."""
    model = load_aligned_encoder(directory)
    config = model.config
    if feature_type == "patch_tokens":
        raise InputError(
            f"{directory}: an aligned encoder (train_clip.py) gives projected embeddings only, not {feature_type}"
        )
    if feature_type not in (None, *FEATURE_TYPES["aligned"]):
        raise InputError(f"feature type {feature_type!r}: an aligned encoder gives 'projected' features only")
    resize_dim = config.resize_dim if resize_dim is None else resize_dim
    crop_dim = config.crop_dim if crop_dim is None else crop_dim
    if crop_dim != config.crop_dim:  # a ViT tower's position embeddings, and what the head was trained on
        raise InputError(f"crop size {crop_dim}: aligned encoder {directory!r} was trained on {config.crop_dim}-pixel crops")
    _check_image_sizes(resize_dim, crop_dim, 1)
    resolved = str(Path(directory).resolve())
    spec = EncoderSpec(
        "aligned", resolved, "projected", resize_dim, crop_dim, list(config.mean), list(config.std), config.feature_dim
    )
    return ImageEncoder(model, spec), build_preprocess(resize_dim, crop_dim, spec.mean, spec.std)


def save_encoder(encoder: ImageEncoder, directory: str | os.PathLike) -> Path:
    """Save the encoder's weights (safetensors) and config to `directory`, which `load_encoder` opens by path
    like the original: an aligned encoder as train_clip.py writes it, a CLIP or DINOv2 model as
    `save_pretrained` does (a whole CLIP keeps only the vision tower and projection it encodes with)."""
    directory = Path(directory)
    if isinstance(encoder.model, AlignedImageEncoder):
        return save_aligned_encoder(directory, encoder.model)
    encoder.model.save_pretrained(directory)
    return directory


def encoder_from_spec(spec: dict[str, Any], source: str = "the recorded encoder") -> tuple[ImageEncoder, Preprocess]:
    """Rebuild the encoder a feature file or checkpoint (`source`) recorded (`EncoderSpec.to_dict()`)."""
    check_encoder_spec(spec, source)
    try:
        encoder, preprocess = load_encoder(
            spec["name"],
            family=spec["family"],
            feature_type=spec["feature_type"],
            resize_dim=spec["resize_dim"],
            crop_dim=spec["crop_dim"],
        )
    except InputError as error:  # a family, feature type or size the file recorded: say which file
        raise InputError(f"{source}: {error}") from None
    recorded_dim = spec.get("feature_dim")
    if recorded_dim is not None and recorded_dim != encoder.spec.feature_dim:
        raise InputError(
            f"encoder {spec['name']!r} gives {encoder.spec.feature_dim}-d features, the spec records {recorded_dim}"
        )
    return encoder, preprocess
