"""The encoder pass every Stage 1 input shares (image files, webdataset shards, predict.py's images):
a batch of pixels to float32 features on the CPU, with the rows the encoder could not represent."""

import torch

from data.features import nonfinite_rows
from models.device import autocast
from models.encoders import ImageEncoder

NONFINITE_REASON = "the encoder gave NaN or infinite features"


def encode_pixels(
    encoder: ImageEncoder, pixels: torch.Tensor, device: torch.device, precision: str
) -> tuple[torch.Tensor, list[int]]:
    """(b, 3, H, W) pixels -> ((b, D) or (b, T, D) float32 CPU features, the rows holding NaN or infinity)."""
    with autocast(device, precision):
        features = encoder(pixels.to(device, non_blocking=True))  # (b, *encoder.row_shape)
    features = features.float().cpu()
    return features, nonfinite_rows(features)
