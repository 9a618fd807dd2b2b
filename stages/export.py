"""Export behind export.py and train.py --export_hf: a train.py checkpoint becomes a Hugging Face-format
directory (models/hf_export.py) with a model card, written whole or not at all, and optionally pushed to
the hub."""

import argparse
import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from data.atomic import PathArgument, atomic_directory, check_output_directory
from data.errors import InputError, first_line
from models.captioner import ClipCaptionModel
from models.checkpoint import captioner_tokenizer, load_checkpoint, read_checkpoint
from models.config import CaptionerConfig
from models.encoders import SPEC_FIELD_TYPES, check_encoder_spec
from models.hf_export import (
    CONFIG_FILE,
    ENCODER_DIR,
    MODEL_TYPE,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    bundled_encoder_source,
    is_export_dir,
    save_export,
)
from models.lm import is_adapter_weight
from stages.train_options import TrainingOptions
from stages.train_state import RunFiles

CARD_FILE = "README.md"
CARD_SKIPS_CONFIG = ("lm_name", "lm_config", "lm_in_checkpoint", "encoder", "lora")  # shown in words, or too long


def check_export_target(
    flag: str, out_dir: str | os.PathLike, inputs: dict[str, PathArgument], overwrite: bool
) -> None:
    """Before any work: the export directory is new, or with --overwrite an earlier export (or empty), and
    apart from every input. --overwrite never deletes a directory that is not an export."""
    check_output_directory(flag, out_dir, inputs, overwrite)
    if os.path.isdir(out_dir) and any(Path(out_dir).iterdir()) and not is_export_dir(out_dir):
        raise InputError(
            f"{flag} {out_dir}: exists and is not an export (no {CONFIG_FILE} of model_type {MODEL_TYPE}); "
            "--overwrite replaces only an earlier export"
        )


def check_repo_id(repo_id: str) -> None:
    """A malformed hub repository name fails at start, not after the export (or a whole training run)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InputError(f"--push_to_hub {repo_id}: not a hub repository id ({first_line(error)})") from None


def _local_name(name: str) -> str:
    """A hub id as it is; a local path by its last component (the card must not publish local paths)."""
    return f"a local directory named `{Path(name).name}`" if os.path.isabs(name) else f"`{name}`"


def _score_rows(scores: Any) -> list[str]:
    return [
        f"| {name} | {100 * value:.2f} |" if isinstance(value, int | float) else f"| {name} | {value} |"
        for name, value in scores.items()
    ]


def _design(config: CaptionerConfig) -> str:
    """The model card's sentence on how the captioner sees an image."""
    if config.cross_attention:
        return (
            "A cross-attention captioner: a frozen image encoder gives patch tokens of width "
            f"{config.feature_dim}, a learned projection maps them to the language model's width, and the "
            "language model, with a cross-attention layer in every block, attends to them while it writes the caption."
        )
    return (
        "A prefix captioner in the line of ClipCap (Mokady et al., 2021): a frozen image encoder gives one "
        f"{config.feature_dim}-d feature per image, a {config.mapping_type} mapper turns it into "
        f"{config.prefix_length} embeddings of the language model, and the language model writes the caption."
    )


def model_card(model: ClipCaptionModel, training: dict[str, Any], checkpoint: Path) -> str:
    """README.md of an export: what the model is, how to caption with it, its training setup (from the
    checkpoint's config), and the scores the checkpoint stores, or that it stores none."""
    config, lm = model.config, model.gpt.config
    encoder, source = config.encoder, bundled_encoder_source(config)
    lm_parameters = sum(
        parameter.numel() for name, parameter in model.gpt.named_parameters() if not is_adapter_weight(name)
    )
    mapper_parameters = sum(parameter.numel() for parameter in model.clip_project.parameters())
    trained = "the mapper and the cross-attention layers were" if config.cross_attention else "the mapper was"
    lm_state = f"frozen (`--only_prefix`: only {trained} trained)" if not config.lm_in_checkpoint else "fine-tuned"
    if config.lora:
        lora = config.lora
        lm_state = (
            f"frozen, with LoRA adapters (rank {lora['r']}, alpha {lora['alpha']}, on {', '.join(lora['targets'])}) "
            "trained with the mapper and merged into its weights"
        )
    if encoder:
        where = f"bundled in `{ENCODER_DIR}/{Path(source).name}`" if source else "loaded by its hub id"
        encoder_line = (
            f"{_local_name(encoder['name'])} ({encoder['family']}, {encoder['feature_type']} features), {where}"
        )
        preprocessing = (
            f"bicubic resize of the short side to {encoder['resize_dim']}, center crop {encoder['crop_dim']}, "
            f"mean {encoder['mean']}, std {encoder['std']} (also in `{PREPROCESSOR_FILE}`)"
        )
    else:
        encoder_line = "not recorded (the features came from a file without meta): caption feature files only"
        preprocessing = "not recorded"
    # Every scalar setting of the config by its name, so a mapper's own settings show whatever its type.
    settings = {name: value for name, value in config.to_dict().items() if name not in CARD_SKIPS_CONFIG}
    setup = [
        ("image encoder", encoder_line),
        ("preprocessing", preprocessing),
        (
            "language model",
            f"{_local_name(config.lm_name)} ({lm.model_type}, {lm_parameters:,} parameters), {lm_state}",
        ),
        ("mapper parameters", f"{mapper_parameters:,}"),
        *[(f"`{name}`", str(value)) for name, value in settings.items()],
        ("epoch", str(training.get("epoch", "not recorded"))),
    ]
    scores = training.get("scores")
    if isinstance(scores, dict) and scores:
        metrics = [
            "Validation scores stored in the checkpoint (train.py `--eval_every`: greedy decoding of `--val_data`, "
            "pycocoevalcap, x100):",
            "",
            "| metric | score |",
            "|---|---|",
            *_score_rows(scores),
        ]
    else:
        metrics = [
            "The checkpoint stores no evaluation scores (train.py keeps them in `{prefix}_best.pt` and in the epochs "
            "it scored, with `--val_data` and `--eval_every`). Score the model with `evaluate.py --checkpoint`."
        ]
    lines = [
        "---",
        "pipeline_tag: image-to-text",
        "tags:",
        "- image-captioning",
        "- clipcap",
        "---",
        "",
        f"# Image captioner: {config.mapping_type} mapper + {lm.model_type}",
        "",
        _design(config) + f" Exported from `{checkpoint.name}` by clipcap-plus's `export.py`.",
        "",
        "## Caption with it",
        "",
        "With clipcap-plus, MODEL_DIR being this directory (from the hub: `hf download REPO_ID --local-dir MODEL_DIR`):",
        "",
        "```bash",
        "python predict.py photo.jpg more_photos/ --checkpoint MODEL_DIR        # images, encoded as in training",
        "python predict.py --features features.pkl --checkpoint MODEL_DIR --output preds.json",
        "python evaluate.py --checkpoint MODEL_DIR --features test_features.pkl",
        "```",
        "",
        "## Training setup",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in setup],
        "",
        "## Metrics",
        "",
        *metrics,
        "",
        "## Files",
        "",
        f"- `{CONFIG_FILE}`: the captioner's config (model_type `{MODEL_TYPE}`), the language model's config, the "
        "encoder and its preprocessing; paths in it are relative to this directory",
        f"- `{WEIGHTS_FILE}`: every weight, mapper (`clip_project.*`) and language model (`gpt.*`); a tied output "
        "layer is stored once, as the embeddings",
        "- the tokenizer files, as `save_pretrained` writes them",
        f"- `{PREPROCESSOR_FILE}`: the image preprocessing as CLIPImageProcessor settings",
        *([f"- `{ENCODER_DIR}/`: the image encoder's weights and config"] if source else []),
        "",
    ]
    return "\n".join(lines)


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool, flag: str = "OUT_DIR"
) -> ClipCaptionModel:
    """Write the export of a train.py checkpoint to `out_dir` (a whole directory, swapped in by rename);
    the LM of an --only_prefix checkpoint comes from its lm_name. Returns the model exported."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise InputError(f"{checkpoint}: is a directory; export a checkpoint file written by train.py")
    check_export_target(flag, out_dir, {"CHECKPOINT": checkpoint}, overwrite)
    record = read_checkpoint(checkpoint)
    training = {key: record[key] for key in ("epoch", "scores") if isinstance(record, dict) and key in record}
    del record  # load_checkpoint reads the file again: one copy of the weights in memory at a time
    model = load_checkpoint(checkpoint)
    if model.config.encoder:  # the preprocessor config and the model card show every field
        check_encoder_spec(model.config.encoder, str(checkpoint), required=tuple(SPEC_FIELD_TYPES))
    lm_dir = model.config.lm_name if os.path.isdir(model.config.lm_name) else None
    inputs = {"CHECKPOINT": checkpoint, "the LM": lm_dir, "the encoder": bundled_encoder_source(model.config)}
    check_export_target(flag, out_dir, inputs, overwrite)  # again, now that the config names its directories
    tokenizer = captioner_tokenizer(model)
    card = model_card(model, training, checkpoint)  # before save_export merges a LoRA model's adapters
    with atomic_directory(out_dir) as building:
        save_export(building, model, tokenizer)
        (building / CARD_FILE).write_text(card, encoding="utf-8")
    print(f"exported {checkpoint} to {out_dir}; caption with: python predict.py IMAGE --checkpoint {out_dir}")
    return model


def push_to_hub(directory: str | os.PathLike, repo_id: str) -> str:
    """Upload an export directory to a hub model repository (created if missing); returns its URL."""
    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message="Upload a clipcap-plus export")
    except Exception as error:
        # The client raises OSError kinds (offline, no token, HTTP errors), ValueError kinds and its HTTP
        # library's own errors (httpx2 in huggingface_hub 2): whichever, the export stays and it is one line.
        raise InputError(
            f"export kept at {directory}; push to {repo_id} failed: {first_line(error)}; "
            "run `hf auth login` (or set HF_TOKEN) and check the network"
        ) from None
    print(f"pushed {directory} to {url}")
    return str(url)


def run_export(args: argparse.Namespace) -> ClipCaptionModel:
    """export.py's run: export the checkpoint, then push it when asked."""
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    model = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    if args.push_to_hub:
        push_to_hub(args.out_dir, args.push_to_hub)
    return model


def _training_inputs(options: TrainingOptions) -> dict[str, PathArgument]:
    final = RunFiles(Path(options.out_dir), options.prefix).epoch_checkpoint(options.epochs - 1)
    return {
        "--data": options.data,
        "--val_data": options.val_data,
        "--init_from": options.init_from,
        "the final checkpoint": final,
    }


def check_training_export(options: TrainingOptions) -> None:
    """train.py --export_hf, at start: a valid export directory and hub id, so a finished run cannot fail on them."""
    if options.export_hf:
        check_export_target("--export_hf", options.export_hf, _training_inputs(options), options.overwrite)
    if options.push_to_hub:
        check_repo_id(options.push_to_hub)


def export_trained(options: TrainingOptions) -> None:
    """train.py --export_hf, at the end: export the final epoch's checkpoint (not `_best.pt`: the model the
    run ended with), then push it when asked."""
    final = _training_inputs(options)["the final checkpoint"]
    export_checkpoint(final, options.export_hf, overwrite=options.overwrite, flag="--export_hf")
    if options.push_to_hub:
        push_to_hub(options.export_hf, options.push_to_hub)
