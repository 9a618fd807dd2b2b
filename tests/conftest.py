"""Shared fixtures: tiny models built from configs, saved once per session, loaded by path."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Tiny models: a second intra-op thread only adds waiting (scripts run as subprocesses keep theirs).
torch.set_num_threads(1)

from models.tiny import save_tiny_clip, save_tiny_dinov2, save_tiny_gpt2  # noqa: E402

# Words of the captions the tests use, so the tiny tokenizer knows them all.
TOKENIZER_TEXTS = [
    "a small red circle above a blue square",
    "two green triangles on a white background",
    "a large yellow star next to a black circle",
    "three purple squares in a row on a gray background",
    "an orange triangle below a small pink circle.",
    "a photo of a dog! a cat, sitting on a mat; two people riding bikes",
] * 4


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A 2-layer CLIP vision tower (224 px, patch 32, 32-d projection)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    """A 2-layer DINOv2 backbone (patch 14, 32-d)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dino"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide GPT-2 with a byte-level BPE trained on TOKENIZER_TEXTS."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), TOKENIZER_TEXTS)
