"""train.py's options, and the model config they make together with the feature file."""

import math
from dataclasses import dataclass
from pathlib import Path

from data.errors import InputError
from data.features import FeatureFile
from models.config import CaptionerConfig
from models.encoders import DINOV2_MODELS
from stages.tracking import DEFAULT_PROJECT


@dataclass
class TrainingOptions:
    """train.py's flags (their defaults live in train.py's parser)."""

    data: str
    out_dir: str
    prefix: str
    epochs: int
    save_every: int
    save_latest_every: int
    prefix_length: int
    prefix_length_clip: int
    batch_size: int
    only_prefix: bool
    mapping_type: str
    num_layers: int
    normalize_prefix: bool
    use_dino: bool
    dino_model_type: str | None
    dino_feature_dim: int | None
    gpt2: str
    lr: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    val_data: str | None
    eval_every: int
    precision: str
    device: str
    num_workers: int
    seed: int
    resume: str | None
    overwrite: bool
    cache_dir: str | None
    max_caption_chars: int
    # --scst (stages/scst.py); defaults as train.py's parser
    scst: bool = False
    init_from: str | None = None
    reward: str = "cider"
    baseline: str = "mean"
    scst_samples: int = 5
    max_length: int = 20
    clip_model: str | None = None
    clip_features: str | None = None
    clip_weight: float = 1.0
    # --export_hf (stages/export.py)
    export_hf: str | None = None
    push_to_hub: str | None = None
    # --wandb (stages/tracking.py)
    wandb: bool = False
    wandb_project: str = DEFAULT_PROJECT
    wandb_run_name: str | None = None


# Flags that must be at least this; checked before anything is read or written.
MINIMUMS = {
    "epochs": 1,
    "save_every": 1,
    "save_latest_every": 1,
    "prefix_length": 1,
    "prefix_length_clip": 1,
    "batch_size": 1,
    "num_layers": 1,
    "warmup_steps": 0,
    "weight_decay": 0,
    "max_grad_norm": 0,
    "eval_every": 0,
    "num_workers": 0,
    "max_caption_chars": 1,
    "scst_samples": 1,
    "max_length": 1,
}
FLAG_NAMES = {"batch_size": "bs"}  # where the flag's name is not the option's


def check_option_values(options: TrainingOptions) -> None:
    """Numeric flags in range (one InputError line), before anything is read, built or deleted."""
    for name, minimum in MINIMUMS.items():
        value = getattr(options, name)
        if isinstance(value, float) and not math.isfinite(value):  # NaN would pass `value < minimum`
            raise InputError(f"--{FLAG_NAMES.get(name, name)} {value}: must be a finite number")
        if value < minimum:
            raise InputError(f"--{FLAG_NAMES.get(name, name)} {value}: must be at least {minimum}")
    if not 0 < options.lr < math.inf:
        raise InputError(f"--lr {options.lr}: must be positive and finite")


def captioner_config(options: TrainingOptions, features: FeatureFile) -> CaptionerConfig:
    """The model config: architecture from the flags, feature width and encoder from the feature file."""
    if options.dino_feature_dim is not None and options.dino_feature_dim != features.feature_dim:
        raise InputError(
            f"--dino_feature_dim {options.dino_feature_dim}, but {options.data} holds {features.feature_dim}-d features"
        )
    encoder = features.meta.get("encoder")  # absent in ClipCap's own files
    family = encoder.get("family") if isinstance(encoder, dict) else None
    if (options.use_dino or options.dino_model_type) and family not in (None, "dinov2"):
        raise InputError(f"--use_dino, but {options.data} holds {family} features")
    if options.dino_model_type and isinstance(encoder, dict):
        expected = DINOV2_MODELS.get(options.dino_model_type, options.dino_model_type)
        if encoder.get("name") != expected:
            raise InputError(
                f"--dino_model_type {options.dino_model_type}, but {options.data} holds features of {encoder.get('name')}"
            )
    if options.mapping_type == "xattn" and features.token_count is None:
        raise InputError(
            f"--mapping_type xattn attends to patch tokens, but {options.data} holds one vector per image; "
            "extract with --feature_type patch_tokens"
        )
    if options.mapping_type != "xattn" and features.token_count is not None:
        raise InputError(
            f"--mapping_type {options.mapping_type} maps one vector per image, but {options.data} holds patch "
            "tokens; use --mapping_type xattn"
        )
    # A directory is recorded absolute, so the checkpoint loads from any working directory.
    lm_name = str(Path(options.gpt2).resolve()) if Path(options.gpt2).is_dir() else options.gpt2
    return CaptionerConfig(
        feature_dim=features.feature_dim,
        prefix_length=1 if options.mapping_type == "xattn" else options.prefix_length,  # xattn: the start embedding
        prefix_length_clip=options.prefix_length_clip,
        mapping_type=options.mapping_type,
        num_layers=options.num_layers,
        normalize_prefix=options.normalize_prefix,
        lm_name=lm_name,
        lm_in_checkpoint=not options.only_prefix,
        encoder=encoder,
    )
