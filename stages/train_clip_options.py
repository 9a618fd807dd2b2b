"""train_clip.py's options: each one's default, help and range, defined once."""

import os
from dataclasses import dataclass

from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from data.options import option
from models.device import DEVICE_HELP, PRECISION_HELP, PRECISIONS
from stages.align_sides import LOCAL_TOWERS
from stages.tracking import TRACKING_GROUP, TrackingOptions

SCHEDULES = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}
GROUPS = {"data": "data", "models": "models", "training": "training", "running": "running", **TRACKING_GROUP}


@dataclass(kw_only=True)
class AlignmentOptions(TrackingOptions):
    """train_clip.py's flags."""

    captions_file: str = option(
        help="annotations: a ClipCap caption list, COCO captions or a Karpathy dataset_*.json", group="data"
    )
    images_dir: str = option(help="directory the annotations' image paths are relative to", group="data")
    split: str | None = option(None, "Karpathy split to train on: train, restval, train+restval, ...", group="data")
    val_split: str | None = option(None, "Karpathy split for Recall@K every epoch (e.g. val)", group="data")
    val_captions_file: str | None = option(
        None, "validation annotations, when not the --captions_file (COCO's val file)", group="data"
    )
    image_encoder: str = option(
        "resnet50",
        f"{', '.join(LOCAL_TOWERS)}, or a CLIP / DINOv2 name, transformers id or directory",
        group="models",
    )
    no_pretrained: bool = option(False, "resnet50 only: random init, not ImageNet weights", group="models")
    text_encoder: str = option("ViT-B/32", "a CLIP name, id or directory with a text tower", group="models")
    train_text: bool = option(
        False, "train the text tower too (otherwise frozen, its embeddings cached)", group="models"
    )
    image_size: int | None = option(
        None, "input side in pixels", minimum=16, shown_default="224, or the named model's own", group="models"
    )
    projection_hidden: int | None = option(
        None, "hidden width of the projection head", minimum=1, shown_default="tower width / 2", group="models"
    )
    cnn_channels: list[int] = option([32, 64, 128], "tiny_cnn: width of each convolution", group="models")
    cnn_stem: int = option(4, "tiny_cnn: patch side (and stride) of the first convolution", minimum=1, group="models")
    out_dir: str = option(help="run directory: encoder/, retrieval.json, checkpoints, log", group="training")
    epochs: int = option(10, "passes over the training images", minimum=1, group="training")
    batch_size: int = option(
        256,
        "images (and captions) per batch and process (under torchrun one InfoNCE batch of them all)",
        flag="bs",
        minimum=1,
        group="training",
    )
    lr: float = option(1e-4, "peak AdamW learning rate", positive=True, group="training")
    weight_decay: float = option(0.01, "AdamW weight decay (not on the temperature)", minimum=0, group="training")
    warmup_steps: int = option(0, "linear warmup steps", minimum=0, group="training")
    schedule: str = option("cosine", "decay after warmup", choices=sorted(SCHEDULES), group="training")
    max_grad_norm: float = option(1.0, "gradient clipping (0: none)", minimum=0, group="training")
    seed: int = option(0, "initial weights, epoch order and caption draws", group="training")
    resume: str | None = option(None, "continue from align_latest.pt (the file or --out_dir)", group="training")
    overwrite: bool = option(False, "replace an earlier run in --out_dir", group="training")
    save_latest_every: int = option(
        1000, "steps between resume checkpoints within an epoch (0: epoch ends only)", minimum=0, group="training"
    )
    cache_dir: str | None = option(
        None, "text-embedding cache", shown_default="train.py's cache directory", group="training"
    )
    cache_images: bool = option(
        False,
        "decode the training images once and keep their pixels in memory (small sets: N x 3 x size^2 floats)",
        group="running",
    )
    eval_batch_size: int = option(256, "images and captions per validation pass", minimum=1, group="running")
    num_workers: int = option(
        min(8, os.cpu_count() or 1), "DataLoader processes decoding images", minimum=0, group="running"
    )
    device: str = option("auto", DEVICE_HELP, group="running")
    precision: str = option("auto", PRECISION_HELP, choices=("auto", *PRECISIONS), group="running")
