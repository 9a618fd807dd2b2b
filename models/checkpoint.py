"""Building, saving and loading captioners. `load_checkpoint(path)` rebuilds a model from the config
stored in a train.py checkpoint alone. predict.py, evaluate.py and SCST open a captioner through one
door, `load_captioner(path)` in models/hf_export.py, which takes a checkpoint (here) or an export
directory alike."""

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.atomic import torch_save_atomic, write_json_atomic
from data.errors import InputError, first_line
from models.captioner import ClipCaptionModel
from models.config import CaptionerConfig
from models.encoders import check_encoder_spec
from models.lm import (
    LEGACY_LM_BUFFERS,
    LM_LAYER_INDEX,
    layer_count,
    lm_config_object,
    lm_from_config,
    load_lm,
    load_tokenizer,
    tied_names,
    unbuildable,
)
from models.lora import add_adapters


def captioner_tokenizer(model: ClipCaptionModel) -> PreTrainedTokenizerBase:
    """The tokenizer of a loaded captioner, from its lm_name. Its LM's config is passed along: in an export
    directory the config.json beside the tokenizer is the captioner's, which transformers does not know."""
    return load_tokenizer(model.config.lm_name, model.gpt.config)


def meta_captioner(config: CaptionerConfig, lm: PreTrainedModel | None, source: str) -> ClipCaptionModel:
    """The captioner `config` describes, its new modules on the meta device: every shape, no memory.
    The LM is `lm`, else built from `config.lm_config`."""
    try:
        with torch.device("meta"):
            return ClipCaptionModel(
                config, lm if lm is not None else lm_from_config(config.lm_config, source, config.lm_dtype)
            )
    except (RuntimeError, ArithmeticError, TypeError, ValueError) as error:
        # Sizes from a file that no module takes: negative, zero heads, a product past int64 (torch's
        # "Storage size calculation overflowed"), a float for a count. The real build would fail the same way.
        raise unbuildable(source, error) from None


def pretrained_captioner_lm(config: CaptionerConfig) -> PreTrainedModel:
    """The LM by `config.lm_name`, in the config's dtype, with fresh LoRA adapters when the config has them."""
    lm = load_lm(config.lm_name, config.cross_attention, config.lm_dtype)
    return add_adapters(lm, config.lora, config.lm_name) if config.lora else lm


def build_captioner(config: CaptionerConfig, lm: PreTrainedModel | None = None) -> ClipCaptionModel:
    """A captioner with a fresh mapper; the LM is `lm`, else loaded by `config.lm_name` (with its adapters).
    Records the LM's config so a fine-tuned model can later be rebuilt without the original."""
    lm = lm if lm is not None else pretrained_captioner_lm(config)
    config.lm_config = lm.config.to_dict()
    return ClipCaptionModel(config, lm)


def checkpoint_payload(
    model: ClipCaptionModel, state: dict[str, torch.Tensor] | None = None, **extra: Any
) -> dict[str, Any]:
    """The dict a checkpoint holds: config, weights (ClipCap's key names; of `state` where given, a sharded
    model's gathered state dict) and any extra state."""
    return {"config": model.config.to_dict(), "model": model.trainable_state_dict(state), **extra}


def save_checkpoint(
    path: str | os.PathLike, model: ClipCaptionModel, state: dict[str, torch.Tensor] | None = None, **extra: Any
) -> None:
    """Save atomically; `state` as in checkpoint_payload; `extra` carries optimizer, scheduler, step and RNG
    state for resuming."""
    torch_save_atomic(checkpoint_payload(model, state, **extra), path)


def save_config_json(path: str | os.PathLike, config: CaptionerConfig) -> None:
    """The config beside the checkpoints, for people and for tools that read JSON."""
    write_json_atomic(path, config.to_dict())


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise InputError(f"{path}: cannot read checkpoint: {first_line(error)}") from None


def check_tensors(state: Any, source: str) -> dict[str, torch.Tensor]:
    """`state` is a dict of named dense tensors, each holding its own values. A view of stride 0 (or a sparse
    tensor) in a small file can claim any shape: 10^8 rows from one stored row, and the model its config
    describes, built to match, would cost 25 GB."""
    named = isinstance(state, dict) and all(isinstance(name, str) for name in state)
    if not named or not all(isinstance(tensor, torch.Tensor) for tensor in state.values()):
        raise InputError(f"{source}: the weights are not a state dict of tensors")
    for name, tensor in state.items():
        stored = tensor.untyped_storage().nbytes() if tensor.layout == torch.strided else 0
        if tensor.numel() * tensor.element_size() > stored:
            raise InputError(
                f"{source}: {name} claims shape {tuple(tensor.shape)} but the file holds {stored} bytes of it; "
                "each weight must be stored whole"
            )
    return state


def check_state(model: ClipCaptionModel, state: Any, source: str) -> dict[str, torch.Tensor]:
    """The weights, in ClipCap's key layout (ours or theirs), checked against `model`'s names and
    shapes (a meta_captioner will do); the LM may be absent when frozen, its new weights (cross-attention
    layers, LoRA adapters) never."""
    state = check_tensors(state, source)
    state = {name: tensor for name, tensor in state.items() if not name.endswith(LEGACY_LM_BUFFERS)}
    expected = model.state_dict()
    tied = tied_names(model)  # stored once, under the first name (GPT-2's lm_head is its token embeddings)
    lm_optional = not model.config.lm_in_checkpoint
    # Cross-attention layers and adapters are trained weights: a checkpoint without them is refused, never
    # filled with the fresh random ones the LM was built with.
    missing = [
        name
        for name in expected
        if name not in state
        and name not in tied
        and not (lm_optional and name.startswith("gpt.") and not model.trains_with_lm_frozen(name))
    ]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise InputError(f"{source}: weights do not match the model config: {'; '.join(details)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise InputError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name].shape)}"
            )
    return state


MAPPER_LAYER_INDEX = re.compile(r"^clip_project\.transformer\.layers\.(\d+)\.")  # the transformer mapper's


def _indices(pattern: re.Pattern, names: Iterable[str]) -> set[tuple[str, ...]]:
    # The LM's are (stack, index): an encoder-decoder counts its encoder's blocks and its decoder's.
    return {match.groups() for name in names if (match := pattern.match(name))}


def check_layer_count(config: CaptionerConfig, names: Iterable[str], source: str) -> None:
    """A config declaring other than the LM blocks or transformer mapper layers the weights hold is refused
    before anything is built: even on the meta device, a claim of 10^5 layers would cost minutes and gigabytes."""
    names = list(names)
    if config.mapping_type == "transformer" and config.num_layers != len(stored := _indices(MAPPER_LAYER_INDEX, names)):
        raise InputError(
            f"{source}: the config declares {config.num_layers} mapper layers, the weights hold {len(stored)}"
        )
    if not config.lm_in_checkpoint or not isinstance(config.lm_config, dict):
        return
    # Read from the built config, not the dict: an alias (num_hidden_layers for n_layer) also sets the count.
    declared = layer_count(lm_config_object(config.lm_config, source))
    stored = _indices(LM_LAYER_INDEX, names)
    if isinstance(declared, int) and declared != len(stored):
        raise InputError(f"{source}: the LM config declares {declared} blocks, the weights hold {len(stored)}")


def load_state_into(model: ClipCaptionModel, state: Any, source: str) -> None:
    """Load weights in ClipCap's key layout (ours or theirs); the LM may be absent when frozen."""
    model.load_state_dict(check_state(model, state, source), strict=False)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ClipCaptionModel:
    """Rebuild a captioner from a checkpoint written by train.py, in eval mode."""
    checkpoint = read_checkpoint(path, map_location)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise InputError(
            f"{path}: not a checkpoint of this repo (no config); for an original ClipCap state dict "
            "use predict.py --weights with its settings"
        )
    config = CaptionerConfig.from_dict(checkpoint["config"], source=str(path))
    if config.encoder:
        check_encoder_spec(config.encoder, str(path), required=())  # what it holds; what is used needs more
    state = check_tensors(checkpoint["model"], str(path))
    lm = None if config.lm_in_checkpoint and config.lm_config else pretrained_captioner_lm(config)
    # Shapes first, on the meta device: a small file whose config declares a large model must not
    # cost that model's memory before it is found out.
    check_layer_count(config, state, str(path))
    check_state(meta_captioner(config, lm, str(path)), state, str(path))
    model = ClipCaptionModel(
        config, lm if lm is not None else lm_from_config(config.lm_config, str(path), config.lm_dtype)
    )
    if not config.lm_in_checkpoint:
        model.freeze_lm()
    load_state_into(model, state, str(path))
    return model.eval()


def load_clipcap_weights(path: str | os.PathLike, config: CaptionerConfig) -> ClipCaptionModel:
    """An original ClipCap checkpoint (a bare state dict) with its settings given as `config`."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or not any(str(name).startswith("clip_project.") for name in state):
        raise InputError(f"{path}: not a ClipCap state dict (no 'clip_project.*' weights)")
    state = check_tensors(state, str(path))
    config.lm_in_checkpoint = any(name.startswith("gpt.") for name in state)
    lm = load_lm(config.lm_name)
    check_layer_count(config, state, str(path))
    # Before the mapper the settings describe is built.
    check_state(meta_captioner(config, lm, str(path)), state, str(path))
    model = build_captioner(config, lm)
    if not config.lm_in_checkpoint:
        model.freeze_lm()
    load_state_into(model, state, str(path))
    return model.eval()
