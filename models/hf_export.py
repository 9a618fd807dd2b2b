"""The Hugging Face-format export of a captioner, and `load_captioner(path)`, which opens an export
directory or a train.py checkpoint file alike.

An export directory holds `config.json` (the captioner's config with `model_type` and `architectures`
naming it, the LM's config, the encoder spec), `model.safetensors` (every weight: mapper and whole LM,
ClipCap's key names, a tied weight stored once), the tokenizer files, `preprocessor_config.json` (the
encoder's preprocessing as transformers' CLIPImageProcessor settings) and, when the encoder was a local
directory, a copy of it under `encoder/`. Paths inside are relative to the directory, so a copy loads
anywhere: `lm_name` is "." (the LM and its tokenizer are here) and a bundled encoder's name is
`encoder/<the original directory's name>` (the last component is what matches feature files to their
encoder, see data.features.check_same_encoder)."""

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase
from transformers.image_utils import PILImageResampling

from data.atomic import write_json_atomic
from data.errors import InputError, read_json_input
from models.captioner import ClipCaptionModel
from models.checkpoint import check_layer_count, check_state, load_checkpoint, load_state_into, meta_captioner
from models.config import CaptionerConfig
from models.encoders import check_encoder_spec, encoder_from_spec, save_encoder
from models.lm import lm_config_object, lm_from_config, tied_names
from models.lora import merge_adapters

MODEL_TYPE = "clipcap_plus_captioner"  # config.json's model_type: what tells an export from other directories
ARCHITECTURES = ["ClipCaptionModel"]
FORMAT_VERSION = 1  # a directory of another version is refused, not misread
CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE = "config.json", "model.safetensors", "preprocessor_config.json"
ENCODER_DIR = "encoder"
# config.json's keys beside the CaptionerConfig fields.
EXPORT_KEYS = ("model_type", "architectures", "format_version", "encoder_bundled")


def bundled_encoder_source(config: CaptionerConfig) -> str | None:
    """The local directory of the config's encoder, which an export bundles; None for a hub id (kept by
    name) or no encoder. load_encoder records local directories as absolute paths."""
    name = (config.encoder or {}).get("name")
    return name if isinstance(name, str) and os.path.isabs(name) else None


def image_processor_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The encoder's preprocessing as transformers' CLIPImageProcessor settings: bicubic short-side resize,
    center crop, rescale to [0, 1], normalize (models/encoders.py's transform)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": spec["resize_dim"]},
        "resample": int(PILImageResampling.BICUBIC),
        "do_center_crop": True,
        "crop_size": {"height": spec["crop_dim"], "width": spec["crop_dim"]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": spec["mean"],
        "image_std": spec["std"],
    }


def save_export(directory: str | os.PathLike, model: ClipCaptionModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write `model` (its whole LM loaded) and its tokenizer into the empty `directory` as an export; a
    local encoder directory is loaded by its spec and saved under `encoder/`. LoRA adapters are merged into
    the LM's weights first, in `model` itself (it becomes the plain captioner it exports), so the export
    needs no peft."""
    directory = Path(directory)
    if model.config.lora:
        merge_adapters(model.gpt)
        model.config.lora = None
    config = CaptionerConfig.from_dict(model.config.to_dict())
    config.lm_name, config.lm_in_checkpoint, config.lm_config = ".", True, model.gpt.config.to_dict()
    if os.path.isabs(config.lm_config.get("_name_or_path", "")):
        config.lm_config["_name_or_path"] = "."  # the LM is here now; and a pushed export must not show local paths
    source = bundled_encoder_source(config)
    if source is not None:
        encoder, _ = encoder_from_spec(config.encoder)
        relative = f"{ENCODER_DIR}/{Path(source).name}"
        save_encoder(encoder, directory / relative)
        config.encoder = {**config.encoder, "name": relative}
    values = {
        "model_type": MODEL_TYPE,
        "architectures": ARCHITECTURES,
        "format_version": FORMAT_VERSION,
        "encoder_bundled": source is not None,
        **config.to_dict(),
    }
    write_json_atomic(directory / CONFIG_FILE, values)
    aliases = tied_names(model)
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items() if name not in aliases
    }
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})  # "pt": what transformers checks for
    tokenizer.save_pretrained(directory)
    if config.encoder:
        write_json_atomic(directory / PREPROCESSOR_FILE, image_processor_config(config.encoder))


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory save_export wrote (its config.json says so)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():  # a FIFO would block the read forever, a link to /dev/zero never end it
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def read_export_config(directory: Path) -> CaptionerConfig:
    """The captioner config of an export, its relative paths resolved against `directory`."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory}: a directory, but not an export of this repo (no {CONFIG_FILE})")
    values = read_json_input(path, "export config")
    if not isinstance(values, dict) or values.get("model_type") != MODEL_TYPE:
        raise InputError(f"{path}: not an export of this repo (its model_type is not {MODEL_TYPE!r})")
    if values.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: export format {values.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    config = CaptionerConfig.from_dict(
        {key: value for key, value in values.items() if key not in EXPORT_KEYS}, str(path)
    )
    if not config.lm_in_checkpoint or not isinstance(config.lm_config, dict):
        raise InputError(f"{path}: an export holds its whole LM, but this config lacks lm_config or says it is absent")
    lm_config_object(config.lm_config, str(path))  # its errors name this file, not the weights counted against it
    config.lm_name = str(directory.resolve())
    if config.encoder:
        check_encoder_spec(config.encoder, str(path), required=())  # what it holds; what is used needs more
    bundled = values.get("encoder_bundled")
    if not isinstance(bundled, bool):
        raise InputError(f"{path}: 'encoder_bundled' is {bundled!r}, not true or false")
    name = (config.encoder or {}).get("name")
    if (config.encoder is not None or bundled) and not isinstance(name, str):
        raise InputError(f"{path}: the encoder's name is {name!r}, not a string")
    if bundled:
        inside = not os.path.isabs(name) and (directory / name).resolve().is_relative_to(directory.resolve())
        if not inside:
            raise InputError(f"{path}: the bundled encoder's name {name!r} is not a path inside the directory")
        config.encoder = {**config.encoder, "name": str((directory / name).resolve())}
    elif name is not None and (os.path.isabs(name) or ".." in Path(name).parts or Path(name).exists()):
        # Not bundled means a hub id: an export must not point its user at another local directory.
        raise InputError(f"{path}: the encoder {name!r} is neither bundled nor a hub id")
    return config


def load_export(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> ClipCaptionModel:
    """Rebuild a captioner from an export directory (no pickle), in eval mode."""
    directory = Path(directory)
    config = read_export_config(directory)
    weights = directory / WEIGHTS_FILE
    if weights.exists() and not weights.is_file():
        raise InputError(f"{weights}: not a regular file (a FIFO would block the reader forever)")
    try:
        with safe_open(weights, framework="pt") as handle:
            # Names and shapes from the header, as meta tensors: checked before any weight is read.
            header = {name: torch.empty(handle.get_slice(name).get_shape(), device="meta") for name in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise InputError(f"{weights}: cannot read the weights ({error})") from None
    check_layer_count(config, header, str(weights))
    skeleton = meta_captioner(config, None, str(directory / CONFIG_FILE))
    check_state(skeleton, header, str(weights))
    if doubled := sorted(tied_names(skeleton) & set(header)):
        raise InputError(f"{weights}: stores {doubled[0]}, a tied weight that is stored under its first name only")
    model = ClipCaptionModel(config, lm_from_config(config.lm_config, str(directory / CONFIG_FILE), config.lm_dtype))
    load_state_into(model, load_file(weights, device=str(map_location)), str(weights))
    return model.eval()


def load_captioner(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ClipCaptionModel:
    """A captioner from a train.py checkpoint file or an export directory, in eval mode."""
    if Path(path).is_dir():
        return load_export(path, map_location)
    return load_checkpoint(path, map_location)
