"""Aligned image encoders (Stage 0's output): an image tower (a torchvision ResNet-50, a CLIP vision
tower, a DINOv2 backbone or a tiny CNN) and a projection head to the text embedding's width, trained
contrastively by train_clip.py. Saved as a directory (`model.safetensors` + `config.json` recording
the architecture, preprocessing and feature width) that `models.encoders.load_encoder` opens by path.

The architecture is rebuilt from `config.json` alone (random weights), then the safetensors file fills
every weight: nothing is downloaded and nothing is pickled."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn
from torchvision.models import resnet50
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from data.atomic import atomic_write, write_json_atomic
from data.errors import InputError

MODEL_TYPE = "clipcap_aligned"  # config.json's model_type: what tells an aligned directory from a hub model
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
RESNET50_WIDTH = 2048  # the pooled features before torchvision's fc layer


@dataclass
class AlignedConfig:
    """Everything that rebuilds an aligned encoder and its preprocessing."""

    tower: str  # "resnet50", "tiny_cnn", "clip" (a CLIP vision tower) or "dinov2"
    tower_dim: int  # width of the tower's pooled output
    projection_hidden: int  # the head: Linear(tower_dim, hidden) -> GELU -> Linear(hidden, feature_dim)
    feature_dim: int  # the text embedding's width: the features extraction writes
    resize_dim: int
    crop_dim: int
    mean: list[float]
    std: list[float]
    tower_config: dict[str, Any] = field(default_factory=dict)  # transformers config, or the tiny CNN's widths
    source: dict[str, Any] = field(default_factory=dict)  # how it was made: image and text encoders, epoch, recall

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> "AlignedConfig":
        """The config of `source`; a missing or mistyped field is one line."""
        values = {key: value for key, value in values.items() if key != "model_type"}
        try:
            config = cls(**values)
        except TypeError as error:
            raise InputError(f"{source}: not an aligned-encoder config ({error})") from None
        if config.tower not in TOWERS:
            raise InputError(f"{source}: unknown tower {config.tower!r}; known: {', '.join(TOWERS)}")
        return config


class TinyCNN(nn.Module):
    """A patchifying stem (a `stem`-pixel, stride-`stem` convolution, as ConvNeXt's), then stride-2 3x3
    convolutions, then global average and max pools side by side (2 x the last width): small enough to
    train on two CPU cores in a minute."""

    def __init__(self, channels: list[int], stem: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        for number, (inputs, outputs) in enumerate(zip([3, *channels[:-1]], channels)):
            # The stem cuts the resolution at once: 3x3 convolutions at full resolution cost ten times more.
            conv = nn.Conv2d(inputs, outputs, stem, stride=stem) if number == 0 else nn.Conv2d(inputs, outputs, 3, 2, 1)
            layers += [conv, nn.BatchNorm2d(outputs), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.layers(pixels)  # (B, C, h, w)
        # The mean counts (it grows with the objects' area); the max says whether a shape's pattern is
        # anywhere, however small the objects (averaged, it drowns in the background).
        return torch.cat((maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))), dim=1)  # (B, 2C)


class ResNetTower(nn.Module):
    """torchvision's ResNet-50 without its classifier: pooled (B, 2048) features."""

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.model = model if model is not None else resnet50()
        self.model.fc = nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


class HubTower(nn.Module):
    """A transformers vision model: CLIP's projected image_embeds, or DINOv2's final-norm CLS token."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=pixels)
        return output.image_embeds if self.kind == "clip" else output.last_hidden_state[:, 0]  # (B, D)


def _hub_model(config: dict[str, Any], kind: str) -> nn.Module:
    """A randomly initialized transformers tower of the recorded architecture."""
    if kind == "clip":
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    settings = dict(config)
    return AutoModel.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))


TOWERS = {
    "resnet50": lambda config: ResNetTower(),
    "tiny_cnn": lambda config: TinyCNN(config.tower_config["channels"], config.tower_config["stem"]),
    "clip": lambda config: HubTower(_hub_model(config.tower_config, "clip"), "clip"),
    "dinov2": lambda config: HubTower(_hub_model(config.tower_config, "dinov2"), "dinov2"),
}


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The lab's head (2048 -> 1024 -> 512 for ResNet-50 to ViT-B/32's text width), GELU between."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class AlignedImageEncoder(nn.Module):
    """Tower + projection head: pixels (B, 3, crop, crop) -> projected embeddings (B, feature_dim)."""

    def __init__(self, config: AlignedConfig, tower: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.tower = tower if tower is not None else TOWERS[config.tower](config)
        self.head = projection_head(config.tower_dim, config.projection_hidden, config.feature_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values).float())  # (B, feature_dim), not normalized (as CLIP's)


def is_aligned_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory train_clip.py wrote (its config.json says so)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def aligned_text_space(directory: str) -> str | None:
    """The CLIP (as ClipScorer names it) whose frozen text tower the encoder at `directory` was aligned to: its
    embeddings live in that tower's space. None when it is not an aligned directory, its text tower was trained
    (--train_text: the space moved), or it records none (written before train_clip.py recorded it)."""
    if not is_aligned_dir(directory):
        return None
    source = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8")).get("source")
    return source.get("text_space") if isinstance(source, dict) else None


def save_aligned_encoder(directory: str | os.PathLike, model: AlignedImageEncoder) -> Path:
    """Weights (safetensors) and config, each written atomically; the config last, so a directory whose
    config names it aligned has its weights."""
    directory = Path(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_write(directory / WEIGHTS_FILE) as handle:
        handle.write(save(state))  # bytes, so the atomic writer owns the file
    write_json_atomic(directory / CONFIG_FILE, model.config.to_dict())
    return directory


def load_aligned_encoder(directory: str | os.PathLike) -> AlignedImageEncoder:
    """Rebuild the encoder from `config.json` and fill every weight from `model.safetensors` (eval mode)."""
    directory = Path(directory)
    try:
        values = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{directory / CONFIG_FILE}: cannot read ({error})") from None
    config = AlignedConfig.from_dict(values, str(directory / CONFIG_FILE))
    # Shapes first: the config's sizes on the meta device against the weights file's header, so a small
    # directory whose config declares a huge tower is refused before that tower costs any memory.
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in AlignedImageEncoder(config).state_dict().items()}
    try:
        with safe_open(directory / WEIGHTS_FILE, framework="pt") as weights:
            stored = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (OSError, SafetensorError) as error:
        raise InputError(f"{directory / WEIGHTS_FILE}: cannot read the weights ({error})") from None
    missing = sorted(set(expected) - set(stored))
    wrong = sorted(name for name in set(expected) & set(stored) if expected[name] != stored[name])
    if missing or wrong or set(stored) - set(expected):
        example = (missing or wrong or sorted(set(stored) - set(expected)))[0]
        raise InputError(f"{directory}: the weights do not match config.json (e.g. {example})")
    model = AlignedImageEncoder(config)
    model.load_state_dict(load_file(directory / WEIGHTS_FILE))
    return model.eval()
